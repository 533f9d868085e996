"""Modules whose attributes are per call: the properties of the ``ModuleType`` subclasses
that ``sys`` (see streams) and ``warnings`` (see warnings_) get as their class."""

from __future__ import annotations

import importlib
import types

from .calls import _NO, _current


def _isolated_property(module: types.ModuleType, name: str, in_call=None, plain=None, copy=None):
    """A property for ``module.name``: inside a call, the value the call assigned, else
    ``in_call`` (when given), else the module's; outside calls, the module's. Assigning
    inside a call changes the call's value only. ``plain`` maps the module's value to what
    Python code gets (the routed stream without override-following); ``copy`` makes the
    call's own value on first use (so that mutating it stays in the call)."""
    namespace = module.__dict__

    def get(_module):
        call = _current.call
        if call is not None:
            value = call.over.get(name, _NO)
            if value is not _NO:
                return value
            if copy is not None:
                value = call.over[name] = copy(namespace[name])
                return value
            if in_call is not None:
                return in_call
        value = namespace[name]
        if plain is not None and value is plain[0]:
            return plain[1]
        return value

    def set_(_module, value):
        call = _current.call
        if call is None:
            namespace[name] = plain[0] if plain is not None and value is plain[1] else value
        elif (plain is not None and (value is plain[0] or value is plain[1])) or (
                in_call is not None and value is in_call):
            call.over.pop(name, None)  # back to the call's routed stream
        else:
            call.over[name] = value

    def delete(_module):
        call = _current.call
        if call is None:
            del namespace[name]
        else:
            call.over[name] = None

    return property(get, set_, delete)



class _IsolatedModule(types.ModuleType):
    """A module with per-call attributes. Pickled by name as modules are (cloudpickle
    looks modules up by their exact type, which this is not)."""

    def __reduce__(self):
        return importlib.import_module, (self.__name__,)
