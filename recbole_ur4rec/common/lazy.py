"""Package attributes imported on first use (PEP 562): light submodules (the Flower ClientApp that forwards
requests to a node worker) then import no torch and no RecBole through their packages' ``__init__``."""
import importlib


def lazy_exports(package, exports):
    """``(__getattr__, __dir__)`` for the package named ``package`` whose attribute ``name`` is
    ``exports[name]``'s attribute of that name, imported when first read."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
