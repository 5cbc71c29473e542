"""Linux kernel primitives used by the local backends (seccomp, ...)."""
