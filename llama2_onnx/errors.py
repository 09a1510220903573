"""Exceptions for mistakes a user can fix; their message is one sentence naming the fix."""


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
