"""The defaults of a run, defined once: the CLI, the widget, the jobs, the pipeline, the bank,
the evaluation and the benchmark import them from here (a leaf module: it imports nothing).
``tests/test_one_home.py`` fails on a literal copy of one of them elsewhere in the package.

The paper's values: the centre of gravity weighs the anomaly map by I^gamma with gamma 5; SAM
gives three masks, the third (finest) is used; each patch's distance is to its nearest bank
patch (k 1); the thresholding baseline binarises the normalised map at 0.5. The bank's defaults:
the paper's 1,024-d patch layout in an exact (flat) faiss index, axial slices, and, from a
labelled dataset, lesion-free slices more than 2 slices from any labelled one.

Tables of choices stay with their owners (patch layouts: ``method.patches.PATCH_LAYOUTS``; index
types: ``bank.indexes.INDEX_TABLE``; presets: ``method.preprocess.PREPROCESS_PRESETS``; slice
axes: ``method.preprocess.SLICE_AXES``); ``tests/test_one_home.py`` checks every default here
is one of its table's choices.
"""

__all__ = [
    "GAMMA",
    "GAMMA_RANGE",
    "GAMMA_STEP",
    "PREFETCH",
    "PREFETCH_STEPS",
    "MASK_INDEX",
    "REGIONS_MASK",
    "K",
    "SIGMA",
    "NORMALISATION",
    "BASELINE_THRESHOLD",
    "GAMMA_SWEEP",
    "K_SWEEP",
    "BACKBONE",
    "PATCH_LAYOUT",
    "INDEX_TYPE",
    "PREPROCESS",
    "SLICE_AXIS",
    "DATASET_MARGIN",
    "BATCH_SIZE",
    "KNN_BATCH_SLICES",
    "LESION_CONNECTIVITY",
    "MIN_LESION_VOXELS",
]

#: Centre-of-gravity exponent (Eq. 2 of the paper).
GAMMA = 5.0
#: The viewer's gamma slider: its range and step.
GAMMA_RANGE: tuple[float, float] = (0.5, 20.0)
GAMMA_STEP = 0.5
#: The viewer decodes the shown slice ahead at the gamma values this many slider steps either side
#: of the current one (nearest first: +-3.0 in all), once it is idle (``MIAS_SAM_PREFETCH=0`` in the
#: environment turns it off): a step, a jump or a drag of the slider within that range then finds
#: the shown slice decoded. Any change stops it.
PREFETCH = True
PREFETCH_STEPS = 6
#: Which of SAM's three masks, 1-based as in the paper (3 = the finest).
MASK_INDEX = 3
#: The mask used with the regions prompt (the volumes' default): the decoder's first (coarsest),
#: clipped to its region. With one box per region the third mask is often a sub-part of the
#: lesion; the development study (docs/results.md) chose 1 (also the most stable of the three).
REGIONS_MASK = 1
#: Nearest bank patches averaged per test patch (1, as the reference code).
K = 1
#: Gaussian smoothing of the anomaly maps, in 256 x 256 frame pixels.
SIGMA = 4.0
#: How distances become a map: "calibrated" (the bank's normal statistics) or "reference" (min-max).
NORMALISATION = "calibrated"
#: The thresholding baseline (and the threshold-box ablation): normalised map > 0.5.
BASELINE_THRESHOLD = 0.5
#: The evaluation's sweeps (``mias-sam evaluate --gammas / --ks``; the benchmark's gamma rows).
GAMMA_SWEEP: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0, 8.0)
K_SWEEP: tuple[int, ...] = (1, 3, 5)

#: The backbone of a new bank (the bundled LiteMedSAM: offline, CPU; SAM needs a weights file).
BACKBONE = "litemedsam"
#: Patch features of a new bank: the paper's 1,024-d layout (``method.patches.PATCH_LAYOUTS``).
PATCH_LAYOUT = "paper1024"
#: faiss index of a new bank: exact, fp32 (``bank.indexes.INDEX_TABLE``).
INDEX_TYPE = "flat"
#: Intensity preset of a bank from NIfTI volumes (``method.preprocess.PREPROCESS_PRESETS``;
#: a labelled dataset's layout names its own, e.g. ``ct-abdomen`` for LiTS).
PREPROCESS = "mri"
#: Slicing axis of a new bank, by name (``method.preprocess.SLICE_AXES``); runs use the bank's.
SLICE_AXIS = "axial"
#: A bank from a labelled dataset keeps only slices more than this many slices from any labelled one.
DATASET_MARGIN = 2
#: Slices encoded per batch (``--batch-size``, the widget's batch size).
BATCH_SIZE = 4
#: Slices searched together by the pipeline's nearest-neighbour step (and counted by the
#: preflight's memory check of that step).
KNN_BATCH_SLICES = 8
#: Lesions are the final mask's 3D connected components: voxels sharing a face, edge or corner
#: (26 neighbours, as BraTS's lesion-wise metrics) join, and a lesion has at least this many voxels
#: (smaller specks stay in the mask but get no lesion id).
LESION_CONNECTIVITY = 26
MIN_LESION_VOXELS = 10
