"""A version's deployment history, and its model card: lineage, approvals, evidence and the
windows it served production, as data and as a Markdown document.

The Markdown escapes every text a model or a person supplied (names, reasons, comments,
metric keys), so a card can never carry a link, an image or HTML that its readers did not
write themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from stagegate.governance import evaluations, lineage, versions
from stagegate.governance.models import Approval, Deployment, ModelVersion, Transition
from stagegate.lifecycle.stages import DeploymentRole


@dataclass(frozen=True)
class Window:
    """A deployment window of one version, with the digest approved for it."""

    role: DeploymentRole
    started_at: datetime
    ended_at: datetime | None
    digest: str | None
    transition_id: str | None


def windows_of(session: Session, model: str, version: int) -> list[Window]:
    """The version's deployment windows, oldest first (404 for an unknown version).

    A window's digest is the one its opening transition was approved for, when that
    transition moved this version; a window restored by a rollback, or opened without an
    approval, carries the version's recorded digest (apply refuses a changed artifact)."""
    row = versions.get_version(session, model, version)
    deps = list(
        session.exec(
            select(Deployment)
            .where(Deployment.model_name == model, Deployment.version == version)
            .order_by(col(Deployment.started_at), col(Deployment.id))
        ).all()
    )
    approved: dict[str, str] = {}
    opened = {d.transition_id for d in deps}
    if opened:
        for tid, digest in session.exec(
            select(Approval.transition_id, Approval.digest)
            .join(Transition, col(Transition.id) == col(Approval.transition_id))
            .where(
                col(Approval.transition_id).in_(sorted(opened)),
                Approval.decision == "approve",
                Transition.version == version,
                col(Approval.digest).is_not(None),
            )
            .order_by(col(Approval.created_at))
        ).all():
            approved[tid] = str(digest)
    return [
        Window(
            d.role,
            d.started_at,
            d.ended_at,
            approved.get(d.transition_id, row.digest),
            d.transition_id,
        )
        for d in deps
    ]


def card(session: Session, model: str, version: int, *, now: datetime) -> dict[str, Any]:
    """The model card as plain data (the API's JSON; `markdown` renders the same dict)."""
    row = versions.get_version(session, model, version)
    moves, approvals, _deps = lineage.history_of(session, row)
    move_of = {t.id: t for t in moves}
    return {
        "model": row.model_name,
        "version": row.version,
        "stage": row.stage.value,
        "digest": row.digest,
        "lineage": _lineage(session, row),
        "approvals": [
            {
                "transition_id": a.transition_id,
                "from_stage": move_of[a.transition_id].from_stage.value,
                "to_stage": move_of[a.transition_id].to_stage.value,
                "approver": a.approver,
                "role": a.role.value,
                "decision": a.decision,
                "comment": a.comment,
                "digest": a.digest,
                "created_at": a.created_at,
            }
            for a in approvals
        ],
        "evidence": [
            {
                "id": e.id or 0,
                "kind": e.kind,
                "passed": e.passed,
                "reason": e.reason,
                "sample_size": e.sample_size,
                "digest": e.digest,
                "champion_version": e.champion_version,
                "window_start": e.window_start,
                "window_end": e.window_end,
                "created_at": e.created_at,
                "summary": e.summary,
            }
            for e in reversed(evaluations.list_for(session, model, version))
        ],
        "production_history": [
            {
                "role": w.role.value,
                "started_at": w.started_at,
                "ended_at": w.ended_at,
                "digest": w.digest,
                "transition_id": w.transition_id,
            }
            for w in windows_of(session, model, version)
            if w.role is DeploymentRole.champion
        ],
        "generated_at": now,
    }


def _lineage(session: Session, row: ModelVersion) -> dict[str, Any]:
    return {
        "run_id": row.run_id,
        "source": row.source,
        "creator": row.creator,
        "code_commit": row.code_commit,
        "registered_at": row.registered_at,
        "metrics": dict(row.metrics),
        "params": dict(row.params),
        "datasets": lineage.datasets_of(session, row),
        "depends_on": [
            {
                "model": name,
                "version": number,
                "stage": up.stage.value
                if (up := versions.find_version(session, name, number))
                else None,
            }
            for name, number in lineage.upstream_of(session, row)
        ],
        "reference_source": row.reference_source,
    }


# -- Markdown ---------------------------------------------------------------------------------

# CommonMark lets a backslash escape any ASCII punctuation. `<`, `>` and `&` become entities
# instead: renderers that escape less (Python-Markdown keeps `\<` as a backslash and a tag)
# still show them as text.
_PUNCTUATION = frozenset("!\"#$%'()*+,-./:;=?@[\\]^_`{|}~")
_ENTITIES = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}


def escape(value: object) -> str:
    """Text as Markdown shows it literally, so no link, image, HTML tag, autolink, emphasis
    or table cell can be formed from it. Line breaks and other control characters become
    spaces, so it cannot start a heading, a list or a link definition on a line of its own."""
    text = "" if value is None else str(value)
    out = []
    for ch in text:
        if ch in _ENTITIES:
            out.append(_ENTITIES[ch])
        elif ch in _PUNCTUATION:
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f" or ch in "\u2028\u2029\u0085":
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def _when(value: datetime | None) -> str:
    return "unknown" if value is None else f"{value:%Y-%m-%d %H:%M:%S} UTC"


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def markdown(c: dict[str, Any]) -> str:
    """The card as a readable Markdown document, with the same content as its JSON."""
    lin = c["lineage"]
    out = [
        f"# Model card: {escape(c['model'])} v{c['version']}",
        "",
        f"- **Stage:** {escape(c['stage'])}",
        f"- **Artifact digest:** {escape(c['digest'] or 'none recorded')}",
        f"- **Generated:** {_when(c['generated_at'])}",
        "",
        "## Lineage",
        "",
        f"- **Registered:** {_when(lin['registered_at'])}",
        f"- **Author (MLflow user):** {escape(lin['creator'] or 'unknown')}",
        f"- **Training run:** {escape(lin['run_id'] or 'none')}",
        f"- **Source:** {escape(lin['source'])}",
        f"- **Code commit:** {escape(lin['code_commit'] or 'unknown')}",
        f"- **Drift reference:** {escape(lin['reference_source'] or 'none')}",
        "",
    ]
    if lin["datasets"]:
        out += ["### Datasets", ""]
        out += _table(
            ["name", "source", "digest", "context"],
            (
                [escape(d["name"]), escape(d["source"]), escape(d["digest"]), escape(d["context"])]
                for d in lin["datasets"]
            ),
        )
        out.append("")
    if lin["depends_on"]:
        out += ["### Depends on", ""]
        out += [
            f"- {escape(d['model'])} v{d['version']} ({escape(d['stage'] or 'unknown')})"
            for d in lin["depends_on"]
        ]
        out.append("")
    if lin["metrics"]:
        out += ["### Metrics", ""]
        out += _table(
            ["metric", "value"],
            ([escape(k), escape(f"{v:.6g}")] for k, v in sorted(lin["metrics"].items())),
        )
        out.append("")
    if lin["params"]:
        out += ["### Parameters", ""]
        out += _table(
            ["param", "value"], ([escape(k), escape(v)] for k, v in sorted(lin["params"].items()))
        )
        out.append("")
    out += ["## Approvals", ""]
    if c["approvals"]:
        out += _table(
            ["when", "move", "who", "role", "decision", "comment", "digest"],
            (
                [
                    _when(a["created_at"]),
                    f"{escape(a['from_stage'])} → {escape(a['to_stage'])}",
                    escape(a["approver"]),
                    escape(a["role"]),
                    escape(a["decision"]),
                    escape(a["comment"] or ""),
                    escape((a["digest"] or "")[:12]),
                ]
                for a in c["approvals"]
            ),
        )
    else:
        out.append("No decisions recorded.")
    out += ["", "## Evidence", ""]
    if c["evidence"]:
        out += _table(
            ["when", "kind", "verdict", "samples", "champion", "reason"],
            (
                [
                    _when(e["created_at"]),
                    escape(e["kind"]),
                    "passed" if e["passed"] else "failed",
                    str(e["sample_size"]),
                    f"v{e['champion_version']}" if e["champion_version"] else "none",
                    escape(e["reason"]),
                ]
                for e in c["evidence"]
            ),
        )
    else:
        out.append("No evaluations recorded.")
    out += ["", "## Production history", ""]
    if c["production_history"]:
        out += _table(
            ["from", "until", "digest", "opened by transition"],
            (
                [
                    _when(w["started_at"]),
                    _when(w["ended_at"]) if w["ended_at"] else "serving",
                    escape((w["digest"] or "")[:12]),
                    escape(w["transition_id"] or ""),
                ]
                for w in c["production_history"]
            ),
        )
    else:
        out.append("Never served production.")
    out.append("")
    return "\n".join(out)
