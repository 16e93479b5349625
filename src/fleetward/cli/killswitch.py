"""`fleetward kill | approve | release | status` (also `kubectl fleetward ...`): the kill
switch for the person on call. Each command is one ordinary change to a KillSwitch, so
plain `kubectl patch` does the same; the identities come from your kubeconfig's
credentials through the API server (the admission webhook stamps them), never from text
typed here.

    fleetward kill githouse-stop --reason "runaway refunds" --namespace githouse --wait
    fleetward approve githouse-stop --comment "root cause fixed"     # as bob, then as carol
    fleetward approve githouse-stop --as bob                         # kubectl's --as (impersonation)
    fleetward release githouse-stop --wait
    fleetward status [githouse-stop]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

GROUP, VERSION, PLURAL = "fleetward.dev", "v1alpha1", "killswitches"
EXIT_REFUSED = 1
EXIT_TIMEOUT = 3


def _kube_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--context", help="kubeconfig context to use")
    p.add_argument(
        "--as",
        dest="as_user",
        metavar="USER",
        help="act as this user, as kubectl --as does (your credentials need RBAC's impersonate verb; the "
        "webhook then records USER)",
    )
    p.add_argument(
        "--as-group",
        dest="as_groups",
        action="append",
        metavar="GROUP",
        help="with --as: the user's groups (repeatable)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    kill = sub.add_parser(
        "kill",
        help="engage a KillSwitch: revoke the covered agents' credentials, drain and stop them",
        description="Engage a KillSwitch. A switch that does not exist yet is created; without "
        "--namespace/--selector it covers every agent in the cluster. A switch that exists (e.g. the "
        "GitHouse example's githouse-stop) is patched: it keeps the scope, mode, drain timeout and actions "
        "it has unless the flags below change them (`fleetward status NAME` shows them).",
    )
    kill.add_argument("name", help="KillSwitch name (cluster-scoped)")
    kill.add_argument("--reason", required=True, help="why the fleet is being stopped (recorded and shown)")
    kill.add_argument("--namespace", "-n", action="append", dest="namespaces", help="only agents here (repeatable)")
    kill.add_argument(
        "--selector",
        "-l",
        help="only agents with these labels, in kubectl's syntax: tier=payments,team=billing; "
        "env in (prod,staging); tier!=test; !canary",
    )
    kill.add_argument("--mode", choices=("drain", "abort"), help="drain (default) or abort in-flight calls at once")
    kill.add_argument(
        "--drain-timeout", type=_drain_timeout, metavar="SECONDS", help="upper bound for the drain, 1-3600 (default 30)"
    )
    kill.add_argument("--keep-replicas", action="store_true", help="do not scale the agents' Deployments to zero")
    kill.add_argument("--wait", action="store_true", help="wait until the switch reports Drained and print it")
    kill.add_argument("--timeout", type=float, default=120, help="seconds --wait waits (default 120)")
    _kube_args(kill)
    kill.set_defaults(handler=_reporting_kube_errors(run_kill))

    approve = sub.add_parser(
        "approve",
        help="approve releasing an engaged KillSwitch (as yourself; two people other than the engager must)",
        description="Add your approval to an engaged KillSwitch's release. The admission webhook records "
        "who you are from your credentials (never from a typed name) and refuses the engager's own "
        "approval. Once two people other than the engager approved, anyone may run `release`.",
    )
    approve.add_argument("name", help="KillSwitch name (cluster-scoped)")
    approve.add_argument("--comment", help="a note kept with your approval")
    _kube_args(approve)
    approve.set_defaults(handler=_reporting_kube_errors(run_approve))

    release = sub.add_parser(
        "release",
        help="release an engaged KillSwitch once two people other than the engager approved",
        description="Set spec.engaged to false. The operator issues fresh credentials (revoked keys are never "
        "reused), restores Kafka access, scales the agents back and publishes resume; halted runs continue "
        "from their checkpoints. Refused until two people other than the engager approved (see `approve`).",
    )
    release.add_argument("name", help="KillSwitch name (cluster-scoped)")
    release.add_argument("--wait", action="store_true", help="wait until the switch reports Released")
    release.add_argument("--timeout", type=float, default=120, help="seconds --wait waits (default 120)")
    _kube_args(release)
    release.set_defaults(handler=_reporting_kube_errors(run_release))

    status = sub.add_parser(
        "status",
        help="list KillSwitches, or show one in detail",
        description="Show the KillSwitches: without a name a table of every switch (engaged, phase, agents "
        "covered, who engaged it, reason); with a name its settings (scope, mode, drain timeout, actions) and "
        "status in detail: who engaged it and when, revocation and drain times, approvals, and the per-agent "
        "results of the last drain.",
    )
    status.add_argument("name", nargs="?", help="KillSwitch name; without it, every switch in a table")
    status.add_argument(
        "-o", "--output", choices=("text", "json"), default="text", help="text for people (default) or the JSON object"
    )
    _kube_args(status)
    status.set_defaults(handler=_reporting_kube_errors(run_status))


class _NoCluster(Exception):
    """No usable kubeconfig, or the API server did not answer: said in one line, no traceback."""


def _reporting_kube_errors(handler):
    def run(args: argparse.Namespace) -> int:
        from urllib3.exceptions import HTTPError

        if args.as_groups and not args.as_user:
            return _fail("--as-group needs --as (the user whose groups they are)", 2)
        try:
            return handler(args)
        except _NoCluster as e:
            return _fail(str(e))
        except HTTPError as e:  # connection refused, TLS, timeouts: the API server did not answer
            return _fail(f"could not reach the Kubernetes API server: {getattr(e, 'reason', None) or e}")

    return run


def _api(args: argparse.Namespace):
    from kubernetes import client, config

    try:
        config.load_kube_config(config_file=args.kubeconfig, context=args.context)
    except (config.ConfigException, OSError, TypeError, ValueError) as e:
        where = args.kubeconfig or "$KUBECONFIG or ~/.kube/config"
        raise _NoCluster(f"no usable kubeconfig ({where}): {e}; pass --kubeconfig FILE") from None
    api_client = client.ApiClient()
    if args.as_user:
        _impersonate(api_client, args.as_user, args.as_groups or [])
    return client.CustomObjectsApi(api_client), api_client


def _impersonate(api_client, user: str, groups: list[str]) -> None:
    """Kubernetes impersonation headers on every request. The client's own default headers
    hold one value per name, and Impersonate-Group takes one header per group, so they are
    added where urllib3 sends the request."""
    from urllib3 import HTTPHeaderDict

    pool = api_client.rest_client.pool_manager
    send = pool.request

    def request(method, url, *args, headers=None, **kwargs):
        merged = HTTPHeaderDict(headers or {})
        merged["Impersonate-User"] = user
        for group in groups:
            merged.add("Impersonate-Group", group)
        return send(method, url, *args, headers=merged, **kwargs)

    pool.request = request


def _refusal(e: Exception) -> str:
    body = getattr(e, "body", None)
    try:
        return json.loads(body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(e)


def _fail(message: str, code: int = EXIT_REFUSED) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def whoami(api_client) -> str:
    """The username the API server authenticates these credentials as."""
    from kubernetes import client

    review = client.AuthenticationV1Api(api_client).create_self_subject_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    )
    return review.status.user_info.username


def _drain_timeout(value: str) -> int:
    try:
        seconds = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of seconds") from None
    if not 1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{seconds} is out of range: 1 to 3600 seconds")
    return seconds


def run_kill(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException

    spec: dict[str, Any] = {"engaged": True, "reason": args.reason}
    scope: dict[str, Any] = {}
    if args.namespaces:
        scope["namespaces"] = args.namespaces
    if args.selector is not None:
        from fleetward.cli.selector import SelectorError, parse_label_selector

        try:
            scope["agentSelector"] = parse_label_selector(args.selector)
        except SelectorError as e:
            return _fail(f"--selector: {e}", 2)
    if scope:
        spec["scope"] = scope
    if args.mode:
        spec["mode"] = args.mode
    if args.drain_timeout is not None:
        spec["drainTimeoutSeconds"] = args.drain_timeout
    if args.keep_replicas:
        spec["actions"] = {"scaleToZero": False}
    objs, _ = _api(args)  # after the flags are checked: a typo is reported without a cluster
    try:
        objs.get_cluster_custom_object(GROUP, VERSION, PLURAL, args.name)
        objs.patch_cluster_custom_object(GROUP, VERSION, PLURAL, args.name, {"spec": spec})
    except ApiException as e:
        if e.status != 404:
            return _fail(f"engaging KillSwitch {args.name} was refused: {_refusal(e)}")
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "KillSwitch", "metadata": {"name": args.name}, "spec": spec}
        try:
            objs.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
        except ApiException as e2:
            return _fail(f"engaging KillSwitch {args.name} was refused: {_refusal(e2)}")
    print(f"KillSwitch {args.name} engaged: {args.reason}")
    _report_coverage(objs, args)
    if args.wait:
        return _wait(objs, args.name, ("Drained",), args.timeout)
    return 0


def _report_coverage(objs, args: argparse.Namespace) -> None:
    """How many Agents the scope matches now: a typo in a namespace or label would otherwise
    engage a switch that stops nothing, and say it worked. Skipped when this user may not
    list Agents (the switch is engaged all the same)."""
    from kubernetes.client.exceptions import ApiException

    selector = args.selector or None  # the API server reads kubectl's syntax itself
    try:
        if args.namespaces:
            items = [
                a
                for ns in args.namespaces
                for a in objs.list_namespaced_custom_object(GROUP, VERSION, ns, "agents", label_selector=selector)[
                    "items"
                ]
            ]
        else:
            items = objs.list_cluster_custom_object(GROUP, VERSION, "agents", label_selector=selector)["items"]
    except ApiException:
        return
    if items:
        print(f"It covers {len(items)} Agent(s) now.")
    else:
        print(
            f"warning: KillSwitch {args.name} covers no Agent now: check --namespace/--selector "
            "(Agents created later in its scope are stopped too)",
            file=sys.stderr,
        )


def run_approve(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException

    objs, api_client = _api(args)
    me = whoami(api_client)
    try:
        ks = objs.get_cluster_custom_object(GROUP, VERSION, PLURAL, args.name)
    except ApiException as e:
        return _fail(f"KillSwitch {args.name}: {_refusal(e)}")
    entry: dict[str, Any] = {"user": me}
    if args.comment:
        entry["comment"] = args.comment
    approvals = (ks.get("spec") or {}).get("approvals")
    rv = ks["metadata"]["resourceVersion"]
    # A JSON patch with a resourceVersion test: an approval added meanwhile is never lost.
    ops: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv}]
    ops.append(
        {"op": "add", "path": "/spec/approvals/-", "value": entry}
        if approvals is not None
        else {"op": "add", "path": "/spec/approvals", "value": [entry]}
    )
    try:
        objs.patch_cluster_custom_object(
            GROUP, VERSION, PLURAL, args.name, ops, _content_type="application/json-patch+json"
        )
    except ApiException as e:
        return _fail(f"approving KillSwitch {args.name} as {me} was refused: {_refusal(e)}")
    n = len(approvals or []) + 1
    print(f"{me} approved releasing KillSwitch {args.name} ({n} approval(s) so far).")
    return 0


def run_release(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException

    objs, _ = _api(args)
    try:
        objs.patch_cluster_custom_object(GROUP, VERSION, PLURAL, args.name, {"spec": {"engaged": False}})
    except ApiException as e:
        return _fail(f"releasing KillSwitch {args.name} was refused: {_refusal(e)}")
    print(f"KillSwitch {args.name} released.")
    if args.wait:
        return _wait(objs, args.name, ("Released",), args.timeout)
    return 0


def _wait(objs, name: str, phases: tuple[str, ...], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ks = objs.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        st = ks.get("status") or {}
        if st.get("phase") in phases and st.get("observedGeneration") == ks["metadata"].get("generation"):
            print(describe(ks))
            return 0
        time.sleep(0.5)
    return _fail(f"KillSwitch {name} did not reach {' or '.join(phases)} within {timeout:.0f} s", EXIT_TIMEOUT)


def describe(ks: dict[str, Any]) -> str:
    from fleetward.api.killswitch import DEFAULT_DRAIN_TIMEOUT_SECONDS

    spec, st = ks.get("spec") or {}, ks.get("status") or {}
    drain_timeout = spec.get("drainTimeoutSeconds", DEFAULT_DRAIN_TIMEOUT_SECONDS)
    lines = [
        f"KillSwitch {ks['metadata']['name']}: {'ENGAGED' if spec.get('engaged') else 'not engaged'}"
        f" (phase {st.get('phase') or '-'})",
        f"  reason:        {spec.get('reason') or '-'}",
        f"  scope:         {_scope_text(spec.get('scope') or {})}",
        f"  mode:          {spec.get('mode') or 'drain'}, drain timeout {drain_timeout} s",
        f"  actions:       {_actions_text(spec.get('actions') or {})}",
        f"  engaged by:    {st.get('engagedBy') or '-'} at {st.get('engagedAt') or '-'}",
        f"  agents:        {st.get('affectedAgents', '-')}",
        f"  revoked in:    {st.get('revocationSeconds', '-')} s (at {st.get('credentialsRevokedAt') or '-'})",
        f"  drained in:    {st.get('drainSeconds', '-')} s (at {st.get('drainedAt') or '-'})",
        f"  approvals:     {', '.join(a['user'] for a in spec.get('approvals') or []) or '-'}",
    ]
    if st.get("releasedBy"):
        lines.append(f"  released by:   {', '.join(st['releasedBy'])} at {st.get('releasedAt')}")
    for a in st.get("agents") or []:
        runs = a.get("runs") or []
        lines.append(f"  - {a['namespace']}/{a['name']}: {a.get('message') or ''}")
        for r in runs:
            lines.append(f"      run {r['runId']} (session {r['sessionId']}) at {r.get('step') or '-'}: {r['outcome']}")
    for c in st.get("conditions") or []:
        lines.append(f"  {c['type']}={c['status']} ({c['reason']}): {c['message']}")
    return "\n".join(lines)


def _scope_text(scope: dict[str, Any]) -> str:
    parts = []
    if scope.get("namespaces"):
        parts.append("namespaces " + ", ".join(scope["namespaces"]))
    selector = scope.get("agentSelector")
    if selector is not None:
        terms = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
        terms += [
            f"{e['key']} {e['operator']}" + (f" ({', '.join(e['values'])})" if e.get("values") else "")
            for e in selector.get("matchExpressions") or []
        ]
        parts.append("agents with " + (", ".join(terms) or "any labels"))
    return "; ".join(parts) or "every agent in the cluster"


def _actions_text(actions: dict[str, Any]) -> str:
    names = ("revokeCredentials", "drainQueues", "closeSessions", "scaleToZero")
    return ", ".join(f"{n}={'true' if actions.get(n, True) else 'false'}" for n in names)


def run_status(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException

    objs, _ = _api(args)
    try:
        if args.name:
            items = [objs.get_cluster_custom_object(GROUP, VERSION, PLURAL, args.name)]
        else:
            items = objs.list_cluster_custom_object(GROUP, VERSION, PLURAL).get("items", [])
    except ApiException as e:
        return _fail(_refusal(e))
    if args.output == "json":
        print(json.dumps(items if not args.name else items[0], indent=2))
        return 0
    if args.name:
        print(describe(items[0]))
        return 0
    print(f"{'NAME':30} {'ENGAGED':8} {'PHASE':9} {'AGENTS':6} {'ENGAGED BY':16} REASON")
    for ks in items:
        spec, st = ks.get("spec") or {}, ks.get("status") or {}
        print(
            f"{ks['metadata']['name']:30} {str(bool(spec.get('engaged'))).lower():8} {st.get('phase') or '-':9} "
            f"{st.get('affectedAgents', '-')!s:6} {st.get('engagedBy') or '-':16} {spec.get('reason') or ''}"
        )
    return 0
