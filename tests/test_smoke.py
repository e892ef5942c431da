import subprocess
import pytest
import sys


@pytest.mark.slow
def test_import_autoprec_loads_no_search_stack():
    code = ("import sys, autoprec; bad = [m for m in ('optuna', 'sqlalchemy', 'pandas') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
