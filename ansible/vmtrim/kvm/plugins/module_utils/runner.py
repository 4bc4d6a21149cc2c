# -*- coding: utf-8 -*-
# GNU General Public License v2.0 or later (see COPYING or https://www.gnu.org/licenses/gpl-2.0.txt)
"""Run one vmtrim command in this process and hand its JSON document to the module.

The modules call vmtrim's own command-line entry point (``vmtrim.cli.run``) with
``--json``, so a task returns exactly the document ``vmtrim ... --json`` prints, with
the same exit codes: 0 all well, 1 findings (a disk blocks, a domain not trimmed),
2 bad input, 3 environment (a host failed, libvirt unreachable). vmtrim's stdout and
stderr are captured: the module's own reply must be the only thing on stdout.
"""

from __future__ import absolute_import, annotations, division, print_function

import io
import json
import sys
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

__metaclass__ = type

# fail_on: which outcomes of single domains fail the task (never is the default). Every
# module has it; start() adds it (doc_fragments/common.py documents its type and choices).
FAIL_ON = ["never", "failed", "blocked"]
FAIL_ON_OPTION: Dict[str, Any] = {"type": "str", "choices": FAIL_ON, "default": "never"}
#: Domain statuses that mean "this domain failed" (trim, run).
FAILED_STATUSES = {"failed"}
#: ... and that mean "discard is blocked" (trim's no_effect, run's blocked/no_effect).
BLOCKED_STATUSES = {"no_effect", "blocked"}

CONNECTION_OPTIONS: Dict[str, Any] = {
    "connect": {"type": "list", "elements": "str", "default": [], "aliases": ["uri"]},
    "hosts_file": {"type": "path"},
    "hosts_parallel": {"type": "int", "default": 8},
    "connect_timeout": {"type": "float", "default": 15.0},
}


def connection_args(params: Dict[str, Any]) -> List[str]:
    """-c URI (repeated), --hosts FILE, and the fleet's concurrency and timeout."""
    args: List[str] = []
    for uri in params.get("connect") or []:
        args += ["-c", uri]
    if params.get("hosts_file"):
        args += ["--hosts", params["hosts_file"]]
    if len(params.get("connect") or []) > 1 or params.get("hosts_file"):
        args += ["--hosts-parallel", str(params["hosts_parallel"])]
        args += ["--connect-timeout", str(params["connect_timeout"])]
    return args


def selection_args(params: Dict[str, Any]) -> List[str]:
    """The named domains, or --all when none is named."""
    domains = list(params.get("domains") or [])
    return domains if domains else ["--all"]


def run_vmtrim(argv: List[str]) -> Tuple[int, Optional[Dict[str, Any]], str]:
    """(exit code, the JSON document or None, what vmtrim wrote on stderr)."""
    from vmtrim.cli import run  # imported here: a missing vmtrim is reported by the caller

    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = run(argv)
    finally:
        sys.stdout, sys.stderr = saved
    text = out.getvalue()
    try:
        doc = json.loads(text) if text.strip() else None
    except ValueError:
        doc = None
    return code, doc, err.getvalue().strip()


def start(argument_spec: Dict[str, Any]) -> Any:
    """The AnsibleModule (check mode supported by every vmtrim module, ``fail_on`` added to
    its options), or None after fail_json when vmtrim cannot be imported by this interpreter."""
    from ansible.module_utils.basic import AnsibleModule

    spec = dict(argument_spec, fail_on=FAIL_ON_OPTION)
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    return None if vmtrim_missing(module) else module


def vmtrim_missing(module: Any) -> bool:
    try:
        import vmtrim  # noqa: F401
    except ImportError as exc:
        module.fail_json(
            msg="vmtrim is not installed for %s: pip install 'vmtrim[libvirt]' (%s)"
            % (sys.executable, exc)
        )
        return True
    return False


def domains_of(doc: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return list((doc or {}).get("domains") or [])


def failed_hosts(doc: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [h for h in (doc or {}).get("hosts") or [] if h.get("status") == "failed"]


def finish(
    module: Any,
    argv: List[str],
    *,
    changed: Callable[[Dict[str, Any]], bool],
    failed: Callable[[Dict[str, Any]], List[str]],
    blocked: Callable[[Dict[str, Any]], List[str]],
    extra: Optional[Dict[str, Any]] = None,
    summary: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
) -> None:
    """Run vmtrim, then exit_json, or fail_json when vmtrim could not do the job at all
    (no document: bad input, no libvirt) or when ``fail_on`` asks for it."""
    code, doc, stderr = run_vmtrim(argv)
    result: Dict[str, Any] = {
        "changed": False,
        "exit_code": code,
        "command": ["vmtrim", *argv],
        "stderr": stderr,
        **(extra or {}),
    }
    if doc is None:
        module.fail_json(
            msg=stderr or "vmtrim exited with %d and printed no document" % code, **result
        )
        return
    result["document"] = doc
    result["changed"] = changed(doc)
    result["failed_domains"] = failed(doc)
    result["blocked_domains"] = blocked(doc)
    result["failed_hosts"] = [h.get("host") for h in failed_hosts(doc)]
    result.update(summary(doc) if summary else {})
    fail_on = module.params.get("fail_on") or "never"
    problems: List[str] = []
    if fail_on in ("failed", "blocked"):
        problems += ["host %s: %s" % (h.get("host"), h.get("reason")) for h in failed_hosts(doc)]
        problems += ["domain %s failed" % name for name in result["failed_domains"]]
    if fail_on == "blocked":
        problems += ["domain %s: discard is blocked" % name for name in result["blocked_domains"]]
    if problems:
        module.fail_json(msg="fail_on=%s: %s" % (fail_on, "; ".join(problems)), **result)
        return
    module.exit_json(**result)


def label(entry: Dict[str, Any]) -> str:
    """``domain`` or ``host/domain`` when the document spans several hosts."""
    name = str(entry.get("domain") or entry.get("name"))
    return "%s/%s" % (entry["host"], name) if entry.get("host") else name


def statuses(doc: Dict[str, Any], wanted: Set[str]) -> List[str]:
    return [label(d) for d in domains_of(doc) if d.get("status") in wanted]


def reclaimed(doc: Dict[str, Any], key: str) -> int:
    return sum(int(d.get(key) or 0) for d in domains_of(doc))
