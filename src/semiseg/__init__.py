"""semiseg: semi-supervised defect segmentation under one protocol."""

import os

# albumentations asks PyPI for its newest version at import; keep the suite offline and quiet.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
