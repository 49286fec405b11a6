"""``dmmh prepare``: the three benchmark files from the datasets' official public releases.

``prepare("mirflickr", raw, "mir_cnn_twt.mat")`` reads the official MIR-Flickr25K release in
``raw``, applies the literature's recipe (DCMH → DJSRH → BSTH), extracts image features
(``"vgg19"`` fc7 by default, or ``"clip:<model>[@<pretrained>]"``), and writes the BSTH key
layout ``I_tr T_tr L_tr I_db T_db L_db I_te T_te L_te`` as MATLAB v7.3, ``.npz`` or
``.safetensors`` (by the suffix), plus ``<file>.manifest.json``; :func:`check` verifies a file
against its manifest. Command line: ``dmmh prepare {mirflickr,nuswide,coco} --raw DIR --out FILE``.
Recipes, sources and expected counts: docs/data.md.
"""

from dmmh.prepare._raw import MissingRawFileError, RawReleaseError
from dmmh.prepare.features import ImageFeatures, image_features
from dmmh.prepare.manifest import CheckFailed, check, read_manifest
from dmmh.prepare.pipeline import DATASETS, MissingImagesError, prepare
from dmmh.prepare.recipe import Recipe, SplitSizes

__all__ = ["prepare", "check", "read_manifest", "image_features", "DATASETS", "ImageFeatures", "Recipe", "SplitSizes",
           "RawReleaseError", "MissingRawFileError", "MissingImagesError", "CheckFailed"]
