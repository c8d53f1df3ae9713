"""One module per process kind; each exposes `body(rt)` run under afd.runtime.role.run_role."""

# role id prefix -> module under afd.roles
ROLE_MODULES = {"attn": "attention_worker", "sched": "attention_scheduler", "combine": "attention_combine",
                "ffn": "ffn_worker", "controller": "controller"}


def split_role(role_id: str) -> tuple[str, int]:
    """'attn0' -> ('attn', 0); 'controller' -> ('controller', 0)."""
    for prefix in ROLE_MODULES:
        if role_id.startswith(prefix):
            rest = role_id[len(prefix):]
            if prefix == "controller" and not rest:
                return prefix, 0
            if rest.isdigit():
                return prefix, int(rest)
    raise ValueError(role_id)
