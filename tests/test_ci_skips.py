""".ci/check_skips.py on JUnit reports written as pytest writes them: a module-level skip
("collection skipped", its reason in the element's text) is judged by that reason, like any other."""
import subprocess
import sys

from adelaidet_support import REPO



def report(tmp_path, *skips):
    cases = "".join(f'<testcase classname="{c}" name="{n}" time="0.0"><skipped message="{m}">{t}</skipped></testcase>'
                    for c, n, m, t in skips)
    path = tmp_path / "r.xml"
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}'
                    '<testcase classname="tests.test_a" name="test_ok" time="0.1" /></testsuite></testsuites>')
    return str(path)


def run(*argv):
    return subprocess.run([sys.executable, str(REPO / ".ci" / "check_skips.py"), *argv], capture_output=True, text=True)


def test_a_module_skip_is_judged_by_its_reason(tmp_path):
    sotr = ("", "tests.test_configs_sotr", "collection skipped",
            "('tests/test_configs_sotr.py', 18, \"Skipped: SOTR's `adet` is not installed here\")")
    missing = ("", "tests.test_integration_mask2former", "collection skipped",
               "('tests/adelaidet_support.py', 88, 'Skipped: mask2former is not importable: run the installer')")
    ok = run(report(tmp_path, sotr), "--env", "main")
    assert ok.returncode == 0 and "collection skipped: SOTR's `adet` is not installed here" in ok.stdout, ok.stdout
    bad = run(report(tmp_path, sotr, missing), "--env", "main")
    assert bad.returncode == 1, bad.stdout
    assert "FAIL: tests.test_integration_mask2former skipped in the main environment: collection skipped: " \
           "mask2former is not importable" in bad.stdout


def test_a_test_skip_keeps_its_message(tmp_path):
    cuda = ("tests.test_a", "test_gpu", "needs CUDA", "tests/test_a.py:3: needs CUDA")
    assert run(report(tmp_path, cuda), "--env", "main").returncode == 0
    other = ("tests.test_a", "test_lvis", "lvis is not installed", "tests/test_a.py:9: lvis is not installed")
    out = run(report(tmp_path, other), "--env", "main")
    assert out.returncode == 1 and "tests.test_a::test_lvis" in out.stdout
