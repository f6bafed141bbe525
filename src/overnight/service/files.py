"""The files of the Files API: bytes in `<folder>/files/<id>`, described in the catalogue.

A file's bytes are written to a temporary name, synced and renamed into place before the
catalogue lists it, so a listed file is always whole; a kill between the two leaves only an
unlisted file, removed at a start an hour or more later.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import IO, Any

from .catalogue import Catalogue

STALE_SECONDS = 3600.0  # a temporary file this old was left by a kill (not a live writer)


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


class FileStore:
    def __init__(self, folder: Path, catalogue: Catalogue) -> None:
        self.folder = folder / "files"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.catalogue = catalogue
        # Left by a kill; only old ones: another server sharing the folder may be writing.
        for stale in self.folder.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if stale.stat().st_mtime < time.time() - STALE_SECONDS:
                    stale.unlink()

    def path(self, file_id: str) -> Path:
        return self.folder / file_id

    def _place(self, file_id: str, write: Any) -> int:
        tmp = self.folder / f".{file_id}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            os.replace(tmp, self.path(file_id))
        finally:
            tmp.unlink(missing_ok=True)
        return size

    def add(
        self,
        tenant: str,
        filename: str,
        purpose: str,
        source: IO[bytes] | Path,
        file_id: str | None = None,
        created_at: int | None = None,
    ) -> dict[str, Any]:
        """Stores the bytes of `source` (an open file, or a path) as a file of `tenant`;
        `file_id` again replaces that file (a batch's result written once more)."""
        file_id = file_id or new_file_id()

        def write(f: IO[bytes]) -> None:
            if isinstance(source, Path):
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 20)
            else:
                shutil.copyfileobj(source, f, 1 << 20)

        size = self._place(file_id, write)
        obj = {
            "id": file_id,
            "filename": filename,
            "purpose": purpose,
            "bytes": size,
            "created_at": created_at or int(time.time()),
        }
        self.catalogue.add_file(tenant, obj)
        return self.catalogue.get_file(tenant, file_id) or obj

    def get(self, tenant: str, file_id: str) -> dict[str, Any] | None:
        return self.catalogue.get_file(tenant, file_id)

    def delete(self, tenant: str, file_id: str) -> bool:
        if not self.catalogue.delete_file(tenant, file_id):
            return False
        self.path(file_id).unlink(missing_ok=True)
        return True
