"""The kaas kernel library: one kernel per file in its own language, with a ``kaas:``
header giving its signature and launch geometry. Installed as ``kaas_magic.library``."""
