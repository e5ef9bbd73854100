"""The one exception type user-facing code catches.

Every problem caused by the input (a bad file, a wrong architecture, an existing output) is an
`AdapterError` with a message that names the file, the module and what is wrong, so the CLI and the
nodes can show it as one line without a traceback.
"""


class AdapterError(ValueError):
    """A clear, one-line problem with user input (file, module, shape, path)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__module__ = AdapterError.__module__  # the subclasses' names are as short (see below)


# ComfyUI names an error by its module, which for a pack loaded from a folder is that folder's path
# ("…/custom_nodes/<pack>.lycoris_core.errors.AdapterError: …" in the error toast): a short one instead.
AdapterError.__module__ = "lycoris"
