"""MkDocs hook: links from a docs page to a file of the repository outside ``docs/`` (a results JSON, a benchmark
script, a findings file) work both on a code host, where the page is read in place, and in the built site.

Every such link target that exists is added to the site as a plain file under ``_repo/`` (copied as it is, never
rendered, so its own links are not followed). A target that does not exist is not added, so MkDocs reports the link
as "not found", which ``mkdocs build --strict`` turns into an error: a moved or renamed results file breaks the build.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

# [text](target) and ![alt](target); the target ends at whitespace or ")". Code spans and blocks are not skipped:
# a link-like text in code that leaves docs/ is registered too, which costs nothing.
LINK = re.compile(r"\]\(([^)\s]+)\)")


class _RepoFile(File):
    """A repository file copied into the site as it is (a ``.md`` file too: not rendered as a page)."""

    def is_documentation_page(self) -> bool:
        return False

    def is_static_page(self) -> bool:
        return False


def on_files(files, config):
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    for page in list(files.documentation_pages()):
        text = Path(page.abs_src_path).read_text(encoding="utf-8")
        for target in LINK.findall(text):
            path = target.split("#", 1)[0]
            if not path or "://" in path or path.startswith(("/", "mailto:")):
                continue
            src_uri = posixpath.normpath(posixpath.join(posixpath.dirname(page.src_uri), path))
            if not src_uri.startswith("../") or files.get_file_from_path(src_uri) is not None:
                continue
            real = (docs / src_uri).resolve()
            if not real.is_file() or repo not in real.parents:
                continue  # left to MkDocs, which reports it as not found
            added = _RepoFile(
                src_uri, src_dir=str(docs), dest_dir=config["site_dir"], use_directory_urls=False,
                inclusion=InclusionLevel.INCLUDED,
            )
            added.abs_src_path = str(real)
            added.dest_uri = "_repo/" + real.relative_to(repo).as_posix()
            files.append(added)
    return files
