"""The CoSMoE reference runtime: reads split bundles and runs them with experts loaded on demand.

Never imports ``cosmoe_export``: this package is what ships next to a device build.
"""

__version__ = "0.1.0"
