"""Human preference evaluation of an evaluate run's downstream replies: blinded pairs, a local
rating page, and win rates with intervals and inter-rater agreement logged back to MLflow.

    personafuse human-eval export outputs/quickstart study/ --pair personafuse:base --external gpt4o=gpt4o.jsonl
    personafuse human-eval serve study/            # raters open http://127.0.0.1:8765/?rater=r1
    personafuse human-eval import study/

Study folder (OUT):
    pairs.jsonl          what raters see: pair id, situation, reply A, reply B (no system names)
    assignments.json     rater -> the pair ids they rate, in their order (overlapping, for agreement)
    key.json             the unblinding key (pair -> system shown as A and as B) and the study settings
    verdicts/<rater>.jsonl   one line per verdict, written by the rating page (temp file + rename)
"""
from __future__ import annotations

PAIRS_FILE = "pairs.jsonl"
ASSIGNMENTS_FILE = "assignments.json"
KEY_FILE = "key.json"
VERDICTS_DIR = "verdicts"
CHOICES = ("A", "B", "tie")
"""What a rater may answer: reply A is better, reply B is better, or neither."""
