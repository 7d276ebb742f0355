"""A folder described by one `manifest.json`, changed only through commits: under the folder's flock, refused
when the manifest on disk is not the one this handle read (another writer, or the folder removed), replaced
atomically. The video stores and the transcripts are such folders."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vidmini.common.files import atomic_write, locked_dir

MANIFEST = "manifest.json"


class StoreConflict(RuntimeError):
    """The store changed on disk under this handle: another writer, or it was removed."""


def dump_manifest(manifest: dict) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True)


class ManifestFolder:
    """The handle's half of the commit discipline: `_text` is the manifest exactly as read (compared before every
    commit), `_m` its parsed copy. Subclasses name what they are (`KIND`, for messages) and may write their
    manifest their own way (`_dump`)."""

    KIND = "store"
    _dump = staticmethod(dump_manifest)

    def __init__(self, path: Path, text: str) -> None:
        self._path = Path(path)
        self._text = text
        self._m = json.loads(text)

    @contextmanager
    def _commit(self) -> Iterator[dict]:
        """Under the folder lock: check the disk still holds what this handle read, yield a copy to change, then
        replace the manifest. An exception inside leaves the manifest and the handle as they were."""
        if not self._path.is_dir():
            raise StoreConflict(f"{self.KIND} {self._path} was removed")
        with locked_dir(self._path):
            try:
                on_disk = (self._path / MANIFEST).read_text()
            except FileNotFoundError:
                raise StoreConflict(f"{self.KIND} {self._path} was removed") from None
            if on_disk != self._text:
                raise StoreConflict(f"{self.KIND} {self._path} was changed by another writer; reopen it")
            new = json.loads(self._text)
            yield new
            text = self._dump(new)
            atomic_write(self._path / MANIFEST, text)
            self._text, self._m = text, json.loads(text)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def manifest(self) -> dict:
        """A copy: change the folder through its handle's methods, not this dict."""
        return json.loads(self._text)
