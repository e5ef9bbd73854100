"""The one exception type user-facing code catches.

Every problem caused by the input (a bad file, a wrong architecture, an existing output) is an
`AdapterError` with a message that names the file, the module and what is wrong, so the CLI and the
nodes can show it as one line without a traceback.
"""


class AdapterError(ValueError):
    """A clear, one-line problem with user input (file, module, shape, path)."""
