"""Errors raised by the passes."""


class RewriteRefused(Exception):
    """The graph cannot be rewritten safely; the message is a one-line reason for the user.

    The backend catches it, warns once and compiles the graph unchanged (plain Inductor).
    """


class NoBlockStack(RewriteRefused):
    """The graph holds attention but no stack of repeated blocks: one block (diffusers' regional compilation
    compiles each block as a graph of its own), or a fragment of the model that a graph break cut off."""


class ShardingRefused(RewriteRefused):
    """A whole sharded graph (context parallelism) whose layout the variants cannot serve: the reason is the
    layout's, not a graph split by graph breaks."""


class PassFailed(RuntimeError):
    """A pass produced a graph that failed verification: a bug in hetcache_compile, not in the model."""

    def __init__(self, pass_name: str, cause: BaseException):
        super().__init__(f"hetcache pass '{pass_name}' failed: {type(cause).__name__}: {cause}")
        self.pass_name = pass_name
        self.cause = cause
