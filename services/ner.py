"""NER daemon for honcho (``Procfile``): ``python services/ner.py``.

Settings come from the TOML file in ``MEDSYN_XAI_CONFIG`` (optional) and the data
root from ``MEDSYN_XAI_ROOT`` (else ``pipeline.root``); logs are JSON lines on
stderr. Same as ``medsyn-xai serve ner``.
"""

import sys

from medsyn_xai.pipeline.daemons import service_main

if __name__ == "__main__":
    sys.exit(service_main("ner"))
