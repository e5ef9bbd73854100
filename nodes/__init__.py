"""The ComfyUI nodes (V3 API). The only part of the pack that imports ComfyUI.

ComfyUI reaches this package through `comfy_entrypoint` in the pack's `__init__.py`. Each node family
is one module; this file holds the ordered node list (the order of the node menu): adding a node is
one module plus one line here.
"""

from comfy_api.latest import ComfyExtension, io

from .converter import LycorisConvert
from .dataset import LycorisSaveDataset
from .hooks import LycorisCreateHook
from .inspector import LycorisInspect
from .loader import LycorisLoader, LycorisLoaderModelOnly
from .merge import LycorisMerge
from .pair import LycorisLoaderWan22Pair
from .tools import LycorisEma, LycorisExtract, LycorisResize, LycorisToLora
from .train_job import LycorisTrainJob
from .training import LycorisApply, LycorisSave, LycorisTrain

NODES: list[type[io.ComfyNode]] = [
    LycorisLoaderModelOnly,
    LycorisLoader,
    LycorisLoaderWan22Pair,
    LycorisCreateHook,
    LycorisInspect,
    LycorisConvert,
    LycorisMerge,
    LycorisToLora,
    LycorisResize,
    LycorisExtract,
    LycorisEma,
    LycorisTrain,
    LycorisSave,
    LycorisApply,
    LycorisSaveDataset,
    LycorisTrainJob,
]


class LycorisExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
