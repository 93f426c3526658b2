#!/usr/bin/env python3
"""CI's skip policy, read from pytest's JUnit reports: once the frameworks were installable
(../shared/frameworks present), a test may skip only for a reason the environment it ran in
cannot change (the other environment's framework: AdelaiDet and SOTR are both ``adet``; a GPU).
Any other skip, above all one that says a framework or package is missing, fails CI.

    python3 .ci/check_skips.py main.xml --env main [sotr.xml --env sotr]
"""
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter

# Skips each environment is allowed, by the reason pytest reports.
ALLOWED = {
    "main": [r"SOTR", r"CUDA|GPU"],  # SOTR's tests run in its own environment
    # the test of SOTR's absence; the end-to-end install test (it runs in the main environment)
    "sotr": [r"SOTR is installed here", r"IUQ_FRAMEWORK_SOURCES", r"CUDA|GPU"],
}


def skips(report):
    for case in ET.parse(report).getroot().iter("testcase"):
        for skipped in case.findall("skipped"):
            reason = (skipped.get("message") or "").strip()
            if reason == "collection skipped":  # a module-level skip: its reason is in the text, e.g.
                # ('tests/test_configs_sotr.py', 18, "Skipped: SOTR's `adet` is not installed here ...")
                found = re.search(r"Skipped: (.*?)['\"]?\)?$", (skipped.text or "").strip(), re.DOTALL)
                reason = f"{reason}: {found.group(1) if found else (skipped.text or '').strip()}"
            test = "::".join(part for part in (case.get("classname"), case.get("name")) if part)
            yield test, reason


def main(argv):
    reports = list(zip(argv[0::3], argv[2::3]))  # (file, env) from "FILE --env ENV ..."
    bad = []
    for report, env in reports:
        found = list(skips(report))
        reasons = Counter(reason for _, reason in found)
        print(f"[ci] {env}: {len(found)} skipped" + "".join(f"\n[ci]   {n} x {r}" for r, n in reasons.items()))
        bad += [(env, test, reason) for test, reason in found
                if not any(re.search(p, reason, re.IGNORECASE) for p in ALLOWED[env])]
    for env, test, reason in bad:
        print(f"[ci] FAIL: {test} skipped in the {env} environment: {reason}")
    if bad:
        print(f"[ci] {len(bad)} test(s) skipped for want of something CI installs: a failure (see .ci/check_skips.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
