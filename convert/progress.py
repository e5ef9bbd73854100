"""Progress of a command that computes an adapter module by module (to-lora, resize, extract, ema).

The work is counted in units (a module decomposed, a module written) and told to a terminal bar
and to `on_progress(done, total)`, which may raise to stop the work (ComfyUI's Cancel): the commands
write atomically, so a stop leaves neither the output nor a temporary file. It is called only while
the output is being made, never once it is in place (a raise then would report a stop that did not
happen), so the last call may come before `done` reaches `total`.
"""

from __future__ import annotations

from collections.abc import Callable

OnProgress = Callable[[int, int], None]


class Progress:
    """    with Progress(total, "extract", bar=True, on_progress=callback) as progress:
            ... progress.step() after each unit ...
    """

    def __init__(self, total: int, desc: str, bar: bool = False, on_progress: OnProgress | None = None):
        from tqdm import tqdm

        self.total, self.done = total, 0
        self.on_progress = on_progress
        self._bar = tqdm(total=total, unit="module", desc=desc, disable=None if bar else True, leave=False)

    def set_total(self, total: int) -> None:
        """The count of units once it is known (extract learns how many layers changed after fitting)."""
        self.total = self._bar.total = total
        self._bar.refresh()

    def step(self, count: int = 1) -> None:
        self.done += count
        self._bar.update(count)
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
