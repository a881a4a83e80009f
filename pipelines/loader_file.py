"""The file that lets diffusers' generic loader open a NaLa pipeline folder.

``DiffusionPipeline.from_pretrained(folder)`` looks a pipeline class up by name in the ``diffusers``
package unless ``model_index.json`` names a file of the folder (``"_class_name": [file, class]``),
diffusers' custom-pipeline convention, which asks for ``trust_remote_code=True``. Every folder a NaLa
pipeline saves carries such a file, :data:`LOADER_SOURCE`: two lines that import the pipeline from the
installed ``nala_diffusion`` package. So::

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

loads it (``nala_diffusion`` must be installed), and without ``trust_remote_code`` diffusers' error says
to pass it; ``custom_pipeline="pipeline_nala_dit_highres"`` gives the high-resolution pipeline. (diffusers
runs a folder's own file even when ``custom_pipeline=`` names a path elsewhere.) That is the user's explicit
choice to run the folder's files, whatever they hold.

``NaLaDiTPipeline.from_pretrained`` and its subclasses never read or run these files: they build the
pipeline from the folder's components (:mod:`~nala_diffusion.pipelines.folder_loading`).
"""

from __future__ import annotations

import json
import os

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
