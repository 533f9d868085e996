"""Which names a cell reads from the notebook and which it gives back (no pool needed)."""

import pytest

from kaas_magic.cellcode import analyse


def test_reads_and_writes_of_a_typical_cell():
    info = analyse("import numpy as np\ny = xp.sqrt(x) + 1\nprint('ran on', device)\n")
    assert {"x", "xp", "device", "print"} <= info.reads
    assert info.writes == ("y",)  # the import stays on the worker


def test_function_parameters_are_not_reads_of_notebook_variables():
    info = analyse("def f(q):\n    return q + w\nz = f(1)\n")
    assert "q" not in info.reads
    assert "w" in info.reads
    assert info.writes == ("f", "z")


def test_unpacking_loops_with_and_walrus_are_writes():
    info = analyse(
        "a, (b, c) = 1, (2, 3)\nfor i in range(2):\n    t = i\n"
        "with open(p) as fh:\n    data = 1\n(n := 5)\nk += 1\n"
    )
    assert info.writes == ("a", "b", "c", "i", "t", "fh", "data", "n", "k")
    assert {"p", "k"} <= info.reads


def test_comprehension_variables_are_local_but_outer_names_are_read():
    info = analyse("g = [k * m for k in range(3)]\nh = {j: k2 for j in w for k2 in j}\n")
    assert {"m", "w"} <= info.reads
    assert not {"k", "j", "k2"} & info.reads


def test_a_name_read_outside_its_comprehension_is_still_read():
    info = analyse("g = [k for k in range(3)]\nprint(k)\n")
    assert "k" in info.reads


def test_syntax_error_reports_the_cell_line():
    with pytest.raises(SyntaxError) as err:
        analyse("a = 1\nb = (\n", "<kaas In[7]>", line_offset=1)
    assert err.value.filename == "<kaas In[7]>"
    assert err.value.lineno == 3  # the %%kaas line is line 1
