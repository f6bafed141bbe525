"""`[run] window = "01:00-06:00"`: when a queue's collected records may be processed (local
time). A window may cross midnight ("22:00-04:00"); start = end is the whole day."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

_FORM = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class Window:
    start: int  # minutes after midnight
    end: int

    @classmethod
    def parse(cls, text: str) -> Window:
        m = _FORM.match(text)
        if m is None:
            raise ValueError(f'`window` must look like "01:00-06:00" (got {text!r})')
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
            raise ValueError(f"`window` {text!r}: hours are 00-23 and minutes 00-59")
        return cls(h1 * 60 + m1, h2 * 60 + m2)

    def contains(self, when: datetime) -> bool:
        minute = when.hour * 60 + when.minute
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end  # across midnight
