"""Free text on the command line, taken exactly as the shell hands it over.

Before Hydra parses argv, the values of free-text fields (prompts, paths, W&B names and tags) are
quoted and escaped in its override grammar, so `prompt=To be, or not to be`, `prompt=日本語` or
`data.path=a,b.txt` work; everything else stays Hydra syntax (-m, +key=, ~key, lists, interpolations).
`as_typed()` turns such overrides back into shell arguments, for commands printed to be pasted.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import shlex
import typing
from pathlib import Path

# How the value of each free-text field is read. TEXT: the text as given. OPTIONAL: the same, except
# that `null` alone stays null. LIST: items separated by commas, optionally inside [...], each taken
# as given (spaces around them dropped). TEXT_OR_LIST: [a, b] is a LIST, anything else OPTIONAL.
TEXT, OPTIONAL, LIST, TEXT_OR_LIST = "text", "optional", "list", "text_or_list"
_LOGGER_TEXT = {"logger.run_name": OPTIONAL, "logger.group": OPTIONAL, "logger.tags": LIST}
TRAIN_TEXT: dict[str, str] = {"data.path": TEXT_OR_LIST, "data.cache_dir": OPTIONAL, "data.tokenizer_path": OPTIONAL,
                              "out_dir": OPTIONAL, "resume": OPTIONAL, "init_from": OPTIONAL, **_LOGGER_TEXT}
SAMPLE_TEXT: dict[str, str] = {"prompt": TEXT, "prompt_file": OPTIONAL, "ckpt": OPTIONAL, "outputs_dir": TEXT,
                               "out_dir": OPTIONAL, **_LOGGER_TEXT}
# Hydra's options that take the next argument as their value (that argument is not an override).
_OPTIONS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c",
                       "--package", "-p", "--info", "-i", "--experimental-rerun", "--shell-completion", "-sc"}
_OVERRIDE = re.compile(r"(\+{0,2})([A-Za-z_][\w.\-]*)=(.*)", re.DOTALL)


def quote_free_text(argv: list[str], fields: dict[str, str]) -> list[str]:
    """argv with the value of every `field=value` (also `+field=`, `++field=`) named in fields rewritten
    as a quoted string of Hydra's grammar that means exactly that text (commas, quotes, `=`, brackets,
    `${...}`, non-ASCII, spaces); everything else is left for Hydra as it is."""
    out, value_of_option = list(argv[:1]), False
    for arg in argv[1:]:
        m = None if value_of_option or arg.startswith("-") else _OVERRIDE.fullmatch(arg)
        if m and m[2] in fields:
            arg = f"{m[1]}{m[2]}={hydra_value(m[3], fields[m[2]])}"
        out.append(arg)
        value_of_option = arg in _OPTIONS_WITH_VALUE  # the next argument is this option's value
    return out


def hydra_value(text: str, kind: str = TEXT) -> str:
    """The override value (Hydra's grammar) that stands for text read as kind (TEXT, OPTIONAL, ...)."""
    if kind in (OPTIONAL, TEXT_OR_LIST) and text == "null":
        return "null"
    bracketed = text.startswith("[") and text.endswith("]")
    if kind == LIST or (kind == TEXT_OR_LIST and bracketed):
        items = [item.strip() for item in (text[1:-1] if bracketed else text).split(",")]
        return "[" + ",".join(hydra_quote(item) for item in items if item) + "]"
    return hydra_quote(text)


def as_typed(overrides: list[str], fields: dict[str, str]) -> list[str]:
    """Overrides as one types them in a shell, for commands printed to be pasted (train.py's resume
    line): quote_free_text undone for the free-text fields, then each argument shell-quoted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf
    parser, out = OverridesParser.create(), []
    for arg in overrides:
        m = _OVERRIDE.fullmatch(arg)
        if m and m[2] in fields and m[3][:1] in ("'", "["):  # written by hydra_value()
            value = parser.parse_override(arg).value()
            texts = [OmegaConf.create({"v": v})["v"] for v in (value if isinstance(value, list) else [value])]
            arg = f"{m[1]}{m[2]}=" + (f"[{', '.join(texts)}]" if isinstance(value, list) else texts[0])
        out.append(shlex.quote(arg))
    return out


def hydra_quote(text: str) -> str:
    """text as a single-quoted string of Hydra's override grammar, which then hands OmegaConf a value
    that resolves to text. Two layers of escaping, inside out:
    - OmegaConf reads `${` as the start of an interpolation: written `\\${`, with the backslashes
      right before it doubled (only when the text holds a `${`; otherwise OmegaConf reads it as is);
    - in a quoted Hydra value only backslashes before a quote and at the end are escapes: a quote
      becomes `\\'` with the backslashes before it doubled, and trailing backslashes are doubled."""
    if "${" in text:
        text = re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", text)
    text = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m[1] * 2, text)
    return f"'{text}'"


def check_added_keys(overrides: list[str], schema: type, config_dir: str) -> None:
    """Refuse, in one ValueError naming the closest real setting, a `+key=value` (or `++key=`) whose key
    is no field of the schema: Hydra would add it where nothing reads it (and Hydra's own hint after a
    typo is to add a `+`). Hydra's `hydra.*` keys and config groups stay allowed."""
    groups = {p.name for p in Path(config_dir).iterdir() if p.is_dir()}
    known = _field_paths(schema)
    for override in overrides:
        m = _OVERRIDE.fullmatch(override)
        if not m or not m.group(1):
            continue
        key = m.group(2)
        if key.startswith("hydra.") or key.split("/")[0] in groups or key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}? (a setting that exists is set without +: {close[0]}={m.group(3)})" \
            if close else "; `python <script>.py --cfg job` lists every setting"
        raise ValueError(f"{override}: no setting is called {key}{hint}")


def _field_paths(schema: type, prefix: str = "") -> list[str]:
    """Every setting of a dataclass schema as a dotted path: ["max_iters", "model.n_layer", ...]."""
    hints = typing.get_type_hints(schema)
    paths = []
    for field in dataclasses.fields(schema):
        kind = hints.get(field.name)
        if dataclasses.is_dataclass(kind):
            paths += _field_paths(kind, f"{prefix}{field.name}.")
        else:
            paths.append(prefix + field.name)
    return paths
