"""The startup-taint ValidatingAdmissionPolicy, evaluated (cel-python) against the requests it must let through and
the ones it must refuse; validate_manifests.py runs it as part of `cargo xtask test`.

The API server's rules, as far as they matter here: a policy applies when every matchCondition is true; a request it
applies to is admitted only if every validation is true; an expression that fails to evaluate refuses the request
(failurePolicy: Fail).
"""

import celpy

AGENT = "system:serviceaccount:nmi-agent:nmi-agent"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
STARTUP = {"key": "nmi-agent.io/not-ready", "value": "true", "effect": "NoSchedule"}
GPU = {"key": "sku", "value": "gpu", "effect": "NoSchedule"}


def node(name, taints=None, labels=None, unschedulable=None):
    spec = {}
    if taints is not None:
        spec["taints"] = taints
    if unschedulable is not None:
        spec["unschedulable"] = unschedulable
    meta = {"name": name}
    if labels is not None:
        meta["labels"] = labels
    return {"metadata": meta, "spec": spec}


def request(user=AGENT, on_node="n1"):
    extra = {NODE_NAME_EXTRA: [on_node]} if on_node else {}
    return {"operation": "UPDATE", "userInfo": {"username": user, "extra": extra}}


TAINTED = node("n1", [GPU, STARTUP], {"agentpool": "np1"})
# (what, request, oldObject, object, admitted)
CASES = [
    ("the agent removes its taint from its own node", request(), TAINTED, node("n1", [GPU], {"agentpool": "np1"}), True),
    ("... when it was the only taint", request(), node("n1", [STARTUP]), node("n1", []), True),
    ("... and a no-op update of its own node", request(), node("n1"), node("n1"), True),
    ("another node", request(on_node="n2"), TAINTED, node("n1", [GPU], {"agentpool": "np1"}), False),
    ("a token without the node name", request(on_node=None), TAINTED, node("n1", [GPU], {"agentpool": "np1"}), False),
    ("removing another taint", request(), TAINTED, node("n1", [STARTUP], {"agentpool": "np1"}), False),
    ("adding a taint", request(), node("n1", [GPU]), node("n1", [GPU, STARTUP]), False),
    ("changing a label", request(), TAINTED, node("n1", [GPU], {"agentpool": "np2"}), False),
    ("cordoning the node while removing the taint", request(), TAINTED, node("n1", [GPU], {"agentpool": "np1"}, True),
     False),
    ("someone else changing labels (not this policy's business)", request(user="system:node:n1"), TAINTED,
     node("n1", [GPU, STARTUP], {"agentpool": "np2"}), True),
    ("the agent installed in another namespace, changing a label", request(user="system:serviceaccount:ops:nmi-agent"),
     TAINTED, node("n1", [GPU, STARTUP], {"agentpool": "np2"}), False),
]


def evaluate(env, expression, activation):
    program = env.program(env.compile(expression))
    return program.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()})


def admitted(policy, activation):
    env = celpy.Environment()
    spec = policy["spec"]
    try:
        if not all(evaluate(env, c["expression"], activation) for c in spec.get("matchConditions", [])):
            return True
        return all(evaluate(env, v["expression"], activation) for v in spec["validations"])
    except Exception:  # noqa: BLE001 - any evaluation failure is a refusal under failurePolicy: Fail
        return False


def check(policy, problem):
    """Runs every case; reports each one the policy gets wrong. Returns the number of cases."""
    for what, req, old, new, want in CASES:
        got = admitted(policy, {"request": req, "oldObject": old, "object": new})
        if got != want:
            verdict = "admits" if got else "refuses"
            problem("startup-taint-policy.yaml", f"the policy {verdict} {what}")
    return len(CASES)
