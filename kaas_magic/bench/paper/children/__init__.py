"""The naive baseline's programs: each file is a whole script, run as ``python FILE
--n N --shots SHOTS --source KERNEL_FILE`` in a fresh process with cold caches. Each one
imports its framework, initialises the device, compiles the kernel read from
``--source``, runs it once, checks the result and prints one JSON line (see ``_child``).
They import nothing from kaas, as a script written without it would not."""
