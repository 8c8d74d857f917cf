"""A progress display for long runs (calibration, the CLI): tqdm when installed, else one line per
step on stderr."""
from __future__ import annotations

import sys
from typing import Optional


class Progress:
    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n = total, desc, 0
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr)
        except ImportError:
            self.bar = None

    def update(self, what: str = "") -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.update(1)
        else:
            print(f"{self.desc} [{self.n}/{self.total}] {what}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def wanted(progress: Optional[bool]) -> bool:
    """progress=None: shown when stderr is a terminal."""
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)
