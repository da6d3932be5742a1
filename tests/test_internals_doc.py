"""docs/INTERNALS.md stays true to the code: every module, class, function and constant it names exists."""
import builtins
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import tokenpaint

DOC = Path(__file__).resolve().parents[1] / "docs" / "INTERNALS.md"


def package_names() -> set[str]:
    """Module-level names of every tokenpaint module, plus the attributes (methods, properties) of its classes."""
    names = set()
    for info in pkgutil.walk_packages(tokenpaint.__path__, "tokenpaint."):
        if info.name.endswith(".__main__"):
            continue  # runs a command line when imported
        try:
            module = importlib.import_module(info.name)
        except ImportError as e:  # an optional extra (serve, ui) that is not installed
            if e.name is None or e.name.startswith("tokenpaint"):
                raise
            continue
        names.add(info.name.rsplit(".", 1)[1])
        for name, value in vars(module).items():
            names.add(name)
            if inspect.isclass(value) and value.__module__.startswith("tokenpaint"):
                names.update(dir(value))
    return names


def listed_names(text: str) -> tuple[set[str], set[str]]:
    """(fully qualified `tokenpaint.x.y` names, bare names) written in backticks as calls, classes or constants."""
    qualified, bare = set(), set()
    for span in re.findall(r"`([^`]+)`", text):
        head = re.match(r"[A-Za-z_][\w.]*", span)
        if head is None:
            continue
        name = head.group(0).rstrip(".")
        if name.startswith("tokenpaint."):
            qualified.add(name)
            continue
        rest = span[len(name):]
        if rest.startswith("/") or name.split(".")[0] in ("torch", "np"):
            continue  # a path (`DIR/`, `OUT/logs/`) or another library's function
        is_call = rest.startswith("(")
        is_class_or_constant = re.fullmatch(r"[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*|[A-Z][A-Z0-9_]{2,}", name) is not None
        if "." in name and not is_call:
            continue  # a dotted path such as `config.json` or `train.bf16` (a file or a config key)
        if is_call or is_class_or_constant:
            bare.add(name.rsplit(".", 1)[-1])
    return qualified, bare


def resolve(qualified: str):
    """Import the longest module prefix of `tokenpaint.a.b.c`, then getattr the rest."""
    parts = qualified.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(qualified)


def test_every_name_in_internals_exists():
    qualified, bare = listed_names(DOC.read_text(encoding="utf-8"))
    assert len(qualified) > 10 and len(bare) > 80  # the parser still finds the names
    for name in sorted(qualified):
        resolve(name)  # raises naming what is missing
    known = package_names() | set(dir(builtins)) | {"pipe"}  # `pipe(...)`: a Pipeline instance in the examples
    missing = sorted(bare - known)
    assert not missing, f"docs/INTERNALS.md names what the code does not have: {missing}"


def test_the_check_catches_a_stale_name():
    qualified, bare = listed_names("`tokenpaint.sampling.sample(...)`, `sample_everything(model)`, `SomeRemovedClass`")
    assert qualified == {"tokenpaint.sampling.sample"} and bare == {"sample_everything", "SomeRemovedClass"}
    assert not {"sample_everything", "SomeRemovedClass"} & package_names()


def test_readme_stays_short_and_links_only_inside_the_repository():
    root = DOC.parents[1]
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if target.startswith(("http://", "https://")):
                continue
            resolved = (doc.parent / target).resolve()
            assert root in resolved.parents and resolved.exists(), f"{doc.name} links to {target}"
    assert len((root / "README.md").read_bytes()) < 7000  # for users; details, tables and method go to docs/
