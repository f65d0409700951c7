import importlib
import pkgutil
import types

import clara


def test_every_exported_name_resolves_and_hides_no_module():
    """``clara.<name>`` for each name in ``__all__`` exists, and no export shadows a submodule: the
    function ``attention`` exported from the package once made ``clara.attention.without_cudnn_attention``
    (as the README writes it) an AttributeError."""
    modules = {info.name for info in pkgutil.iter_modules(clara.__path__)}
    for name in clara.__all__:
        assert hasattr(clara, name), name
        assert name not in modules, f"clara.{name} is exported, hiding the module clara/{name}.py"
    for name in modules:
        module = importlib.import_module(f"clara.{name}")
        assert getattr(clara, name) is module and isinstance(module, types.ModuleType)
