"""The secret mask: every secret held now is masked in every field, and follows rotation."""

from __future__ import annotations

import io
import json
import logging

import structlog

from exporter.logs import SecretMask, configure_logging


def test_mask_covers_nested_values_keys_event_text_and_stdlib_lines() -> None:
    """A held secret is masked wherever it stands, including in other libraries' lines."""
    held = ["s3cr3t-token-value"]
    mask = SecretMask()
    mask.watch("api", lambda: held)
    out = io.StringIO()
    configure_logging("debug", "json", out, mask=mask)
    log = structlog.get_logger("test")
    log.warning(
        "echo s3cr3t-token-value",
        nested={"list": ["x s3cr3t-token-value"], "s3cr3t-token-value": 1},
        number=3,
    )
    logging.getLogger("aiohttp.client").warning("lib %s", "s3cr3t-token-value")
    text = out.getvalue()
    assert "s3cr3t-token-value" not in text
    first, second = map(json.loads, text.splitlines())
    assert first["event"] == "echo <secret>"
    assert first["nested"] == {"list": ["x <secret>"], "<secret>": 1}
    assert first["number"] == 3
    assert second["event"] == "lib <secret>"


def test_mask_follows_the_source_and_leaves_lines_alone_without_secrets() -> None:
    """A rotated secret is masked at once; with nothing held the event is passed through."""
    held: list[str] = []
    mask = SecretMask()
    mask.watch("api", lambda: held)
    event = {"event": "nothing to hide"}
    assert mask(None, "info", event) is event
    held.append("short")  # short secrets are masked too: see SecretMask's docstring
    assert mask.mask("a short one") == "a <secret> one"
    held[0] = "rotated-secret"
    assert mask.mask("short rotated-secret") == "short <secret>"


def test_a_source_watched_while_a_line_is_masked_does_not_break_that_line() -> None:
    """watch() from one thread while another masks a line (stdlib loggers log from threads)
    leaves that line's iteration intact; the new source counts from the next line. Here the
    watch happens inside a source, the same interleaving made deterministic."""
    mask = SecretMask()

    def source_that_watches() -> list[str]:
        mask.watch("admin", lambda: ["admin-secret"])
        return ["api-secret"]

    mask.watch("api", source_that_watches)
    assert mask.mask("api-secret admin-secret") == "<secret> admin-secret"
    assert mask.mask("api-secret admin-secret") == "<secret> <secret>"


def test_mask_covers_every_percent_encoding_and_json_escape_of_a_secret() -> None:
    """An echoed secret is masked however a gateway encoded it: percent-encoded in either case
    of hex, only partly, or JSON-escaped; the text around it is kept."""
    secret = 'wJalr/K7MDENG+bPxRfi"CYEXAMPLEKEY'
    mask = SecretMask()
    mask.watch("aws", lambda: [secret])
    encodings = [
        secret,
        "wJalr%2FK7MDENG%2BbPxRfi%22CYEXAMPLEKEY",  # upper-case hex
        "wJalr%2fK7MDENG%2bbPxRfi%22CYEXAMPLEKEY",  # lower-case hex
        'wJalr/K7MDENG%2BbPxRfi"CYEXAMPLEKEY',  # only the "+"
        json.dumps(secret)[1:-1],  # '\\"'
        secret.replace("/", "\\/"),
    ]
    for encoded in encodings:
        assert mask.mask(f"echo: {encoded}!") == "echo: <secret>!", encoded
    assert mask.mask("wJalr%2FK7MDENG") == "wJalr%2FK7MDENG"  # a part is not the secret
