"""``flexmask.hf``: flexmask inside Hugging Face transformers models (see :mod:`flexmask.integrations.hf`).

Importing it needs ``transformers`` (``pip install -e ".[hf]"``).
"""

from .integrations.hf import *  # noqa: F403
from .integrations.hf import __all__  # noqa: F401
