"""The file that lets diffusers' generic loader open a NaLa pipeline folder.

``DiffusionPipeline.from_pretrained(folder)`` looks a pipeline class up by name in the ``diffusers``
package unless ``model_index.json`` names a file of the folder (``"_class_name": [file, class]``),
diffusers' custom-pipeline convention, which asks for ``trust_remote_code=True``. Every folder a NaLa
pipeline saves carries such a file, :data:`LOADER_SOURCE`: two lines that import the pipeline from the
installed ``nala_diffusion`` package. So::

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

loads it (``nala_diffusion`` must be installed), and without ``trust_remote_code`` diffusers' error says
to pass it; ``custom_pipeline="pipeline_nala_dit_highres"`` gives the high-resolution pipeline. (diffusers
runs a folder's own file even when ``custom_pipeline=`` names a path elsewhere.)
``NaLaDiTPipeline.from_pretrained`` and its subclasses need no flag: they run the file only when its
code is a docstring and one import of this package's pipeline class (:func:`only_imports_this_package`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

LOADER_MODULE = "pipeline_nala_dit"
LOADER_CLASS = "NaLaDiTPipeline"
_TEMPLATE = '''"""Opens this folder with diffusers' loader{how}:

    DiffusionPipeline.from_pretrained(folder, {argument}trust_remote_code=True)

The code is the installed nala_diffusion package's (pip install nala-diffusion); this file only names it.
"""

from nala_diffusion.pipelines.{module} import {name}  # noqa: F401
'''
#: file name (module) -> its text: the generic loader's file, and one per other pipeline class, which
#: ``custom_pipeline="<module>"`` picks (diffusers prefers a folder's own file to a ``custom_pipeline`` path)
LOADER_FILES = {
    LOADER_MODULE: _TEMPLATE.format(how="", argument="", module=LOADER_MODULE, name=LOADER_CLASS),
    "pipeline_nala_dit_highres": _TEMPLATE.format(
        how=" as the high-resolution pipeline", argument='custom_pipeline="pipeline_nala_dit_highres", ',
        module="pipeline_nala_dit_highres", name="NaLaDiTHighResPipeline"),
}
LOADER_SOURCE = LOADER_FILES[LOADER_MODULE]
HUB_KEYS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")


def write_loader_file(folder: str) -> None:
    """Write :data:`LOADER_FILES` into a saved pipeline folder and name the generic loader's file in its
    ``model_index.json``."""
    from nala_diffusion.utils.files import write_json_atomically, write_text_atomically

    for module, text in LOADER_FILES.items():
        write_text_atomically(os.path.join(folder, module + ".py"), text)
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path, encoding="utf-8") as handle:
        index = json.load(handle)
    index["_class_name"] = [LOADER_MODULE, LOADER_CLASS]
    write_json_atomically(index_path, index)


def _fetch(name: str, filename: str, options: Dict[str, Any]) -> Optional[str]:
    """The local path of ``filename`` in a folder or Hub repository, or None where it is absent."""
    if os.path.isdir(name):
        path = os.path.join(name, filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(name, filename, **{k: v for k, v in options.items() if k in HUB_KEYS})
    except Exception:  # not there, or not reachable: diffusers' own loader reports it
        return None


def carries_own_loader(name: str, options: Dict[str, Any]) -> bool:
    """Whether a folder or Hub repository names :data:`LOADER_MODULE` in its ``model_index.json`` and
    that file only imports the installed package (:func:`only_imports_this_package`)."""
    index_path = _fetch(os.fspath(name), "model_index.json", options)
    if index_path is None:
        return False
    with open(index_path, encoding="utf-8") as handle:
        class_name = json.load(handle).get("_class_name")
    if class_name != [LOADER_MODULE, LOADER_CLASS]:
        return False
    path = _fetch(os.fspath(name), LOADER_MODULE + ".py", options)
    if path is None:
        return False
    with open(path, encoding="utf-8") as handle:
        return only_imports_this_package(handle.read())


#: what a loader file may import: the pipeline classes of the installed package
TRUSTED_IMPORTS = {"nala_diffusion.pipelines.pipeline_nala_dit": {"NaLaDiTPipeline"},
                   "nala_diffusion.pipelines.pipeline_nala_dit_highres": {"NaLaDiTHighResPipeline"}}


def only_imports_this_package(text: str) -> bool:
    """Whether a loader file's code is a docstring and one ``from nala_diffusion.pipelines... import``
    of a pipeline class, nothing else (the text of :data:`LOADER_FILES`, in this or an earlier wording),
    so that running it runs only the installed package."""
    import ast

    try:
        body = ast.parse(text).body
    except SyntaxError:
        return False
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if len(body) != 1 or not isinstance(body[0], ast.ImportFrom) or body[0].level:
        return False
    allowed = TRUSTED_IMPORTS.get(body[0].module, set())
    return bool(body[0].names) and all(alias.name in allowed and alias.asname is None for alias in body[0].names)
