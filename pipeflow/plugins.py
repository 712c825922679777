"""Stage plugins: find and load the stages installed packages publish under the
entry-point group ``pipeflow.stages``.

A package declares its stages in its ``pyproject.toml``::

    [project.entry-points."pipeflow.stages"]
    upper = "my_package.stages:Upper"

and users list them with ``pipeflow plugins``, or from Python::

    from pipeflow.plugins import discover_stages, load_stage

    for name, entry_point in discover_stages().items():   # nothing imported yet
        print(name, entry_point.value)
    Upper = load_stage("upper")                            # imports that one plugin
"""

from ._plugins import GROUP as GROUP
from ._plugins import discover_stages as discover_stages
from ._plugins import load_stage as load_stage

__all__ = ["GROUP", "discover_stages", "load_stage"]
