"""Orchestration and storage: CLI, stage graph, stage keys, cache, feature stores, dataset manifests.

Nothing here imports a domain package (extractors, localizers, detectors) or torch at import time:
planning must stay light. Stage functions are found through the entry strings of stages.yaml.
"""

__version__ = "0.1.0"
