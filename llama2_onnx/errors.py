"""Exceptions for mistakes a user can fix; their message is one sentence naming the fix."""

import re

# A URL inside free text (an error message, git's stderr): scheme, user info, the rest up to
# a space or quote, then its query and fragment, which are where tokens hide.
_URL_IN_TEXT = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/@'\"`<>]*@)?"
                          r"(?P<rest>[^\s?#'\"`<>]*)(?P<query>\?[^\s#'\"`<>]*)?"
                          r"(?P<fragment>#[^\s'\"`<>]*)?")
# An scp-like git URL in free text (user@host:path), then its query and fragment.
_SCP_IN_TEXT = re.compile(r"(?P<rest>[\w.-]+@[\w.-]+:[^\s?#'\"`<>]*)(?P<query>\?[^\s#'\"`<>]*)?"
                          r"(?P<fragment>#[^\s'\"`<>]*)?")


def mask_secrets(text: str) -> str:
    """`text` with the user info, query and fragment of every URL in it replaced by `***`.

    Every message that shows a URL (ours, or git's stderr echoed in one) goes through this.
    """
    def mask(match: re.Match) -> str:
        groups = match.groupdict()
        return (groups.get("scheme", "") + ("***@" if groups.get("userinfo") else "")
                + match["rest"] + ("?***" if match["query"] else "")
                + ("#***" if match["fragment"] else ""))
    return _SCP_IN_TEXT.sub(mask, _URL_IN_TEXT.sub(mask, text))


class UserError(Exception):
    """A problem with the user's input or files; the CLIs print it and exit with code 2."""


class ConfigError(UserError):
    """A config.json or params.json that cannot describe a Llama 2 model."""


class VariantError(UserError):
    """A variant folder that is missing, incomplete, or not pulled from Git LFS."""


class CheckpointError(UserError):
    """A source checkpoint folder that cannot be read."""


class VerificationError(UserError):
    """An exported graph whose logits disagree with the PyTorch reference."""


class GenerationError(UserError):
    """Bad generation settings or a prompt that cannot be run."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived; raised like Ctrl-C so cleanup (finally blocks) runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class PublishError(UserError):
    """A publish that cannot go ahead: bad remote URL, failed push or upload, unusable repo.

    Its message is shown with URL secrets masked, whatever it quotes.
    """

    def __init__(self, message: str) -> None:
        super().__init__(mask_secrets(message))


def is_whole_number(value: object, least: int = 1) -> bool:
    """Whether `value` is an int (not a bool) of at least `least`: the one check of counts that
    users give (tokens, lengths, chunks), each caller saying what the count is."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least
