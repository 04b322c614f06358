"""Stored KV answers to the model and the tenant that read it: identity and seal on every read,
named errors or skipped entries (never raw, never a hang) for what a directory may hold, and a
corruption campaign over segment files (counts printed with ``-s``)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import threading
from pathlib import Path

import pytest
import torch

from kvshare import Engine, EngineConfig
from kvshare.errors import CacheDirError
from kvshare.scope import Scope
from kvshare.store.disk import DiskTier, model_digest
from kvshare.store.identity import KVIdentity
from kvshare.store.seal import KEY_FILE, Sealer
from kvshare.store.segment_file import file_name
from kvshare.store.segments import StoredSegment

from factories import DOC, kv_for

IDENTITY = KVIdentity("llama", "w" * 32, "c" * 32, "torch.float32", "sdpa")
OTHER_MODEL = KVIdentity("llama", "v" * 32, "c" * 32, "torch.float32", "sdpa")
TENANT_A, TENANT_B = Scope("tenant", "A"), Scope("tenant", "B")


def seg(scope=TENANT_A, name="h0", n=6, seed=0) -> StoredSegment:
    tokens = tuple(range(seed, seed + n))
    return StoredSegment(scope, name, tokens, kv_for(tokens), "prompt", "user", None, 0)


def exact(got: StoredSegment | None, want: StoredSegment) -> bool:
    return got is not None and all(
        torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        for a, b in ((got.kv.keys, want.kv.keys), (got.kv.values, want.kv.values))
    )


def path_of(tier: DiskTier, s: StoredSegment) -> Path:
    return tier.path / file_name(*s.key)


def within(seconds: float, fn, *args):
    """fn(*args) in a thread; fails the test if it does not return in ``seconds``."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn.__name__} blocked for {seconds} s"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")


# --- identity -----------------------------------------------------------------------------


def test_the_kv_identity_covers_weights_and_kv_shaping_config(tiny_dirs):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_model

    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    theta = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["llama"]))  # the seed-0 weights
    theta.config.rope_parameters = {**theta.config.rope_parameters, "rope_theta": 50000.0}
    same = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["llama"]))
    ids = [KVIdentity.of(m) for m in (a, b, theta, same)]
    assert ids[0].weights != ids[1].weights  # other weights, same shapes
    assert ids[2].weights == ids[3].weights and ids[2].config != ids[3].config  # rope_theta
    assert model_digest(ids[0]) == model_digest(KVIdentity.of(a))
    assert len({model_digest(i) for i in ids}) == 3
    same.config.use_cache = not same.config.use_cache  # no KV effect: the same identity
    assert KVIdentity.of(same) == ids[3]


def copy_files(src: DiskTier, dst: DiskTier) -> int:
    n = 0
    for p in src.path.glob("*.safetensors"):
        shutil.copy(p, dst.path / p.name)
        n += 1
    return n


def test_another_models_file_copied_in_is_refused(tmp_path):
    a = DiskTier(tmp_path, 1 << 20, IDENTITY)
    s = seg()
    a.put(s)
    b = DiskTier(tmp_path, 1 << 20, OTHER_MODEL)
    assert copy_files(a, b) == 1 and b.get(s.key, s.tokens) is None  # not indexed
    restarted = DiskTier(tmp_path, 1 << 20, OTHER_MODEL)
    assert len(restarted) == 0 and restarted.corrupt == 1  # at open: its header names A's model
    assert list(restarted.path.iterdir()) == []


def engine_on(path: Path, model_dir: Path, mode: str = "kvshare") -> Engine:
    config = EngineConfig.of(  # a device tier too small for any trace: each goes to disk
        mode=mode, segment_store_bytes=1024, prefix_cache_bytes=0, disk_tier_dir=str(path)
    )
    return Engine.from_pretrained(str(model_dir), config=config)


def doc_call(e: Engine, question: str):
    msgs = [{"role": "user", "content": DOC}, {"role": "user", "content": question}]
    return e.chat(msgs, tenant="A", max_new_tokens=6)


def test_rope_theta_or_other_weights_never_read_each_others_kv(tiny_dirs, tmp_path):
    """The probe's cases 1 and 2, end to end: engine A's disk files copied into the directory
    of an engine with other weights, or the same weights and another rope_theta, are never
    relocated; each reply equals that engine's own without any stored KV."""
    import transformers

    src = Path(tiny_dirs["llama"])
    theta_dir, other_dir = tmp_path / "theta", tmp_path / "other"
    shutil.copytree(src, theta_dir)
    cfg = json.loads((theta_dir / "config.json").read_text())
    cfg["rope_parameters"] = {**cfg.get("rope_parameters", {}), "rope_theta": 50000.0}
    (theta_dir / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(src, other_dir)
    other = transformers.AutoModelForCausalLM.from_pretrained(str(src))
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)
    other.save_pretrained(str(other_dir))
    writer = engine_on(tmp_path / "kv", src)
    doc_call(writer, "Which ships?")
    [a_tier] = [t for t in writer.segments.tiers if t.name == "disk"]  # type: ignore[attr-defined]
    for model_dir in (theta_dir, other_dir):
        reader = engine_on(tmp_path / "kv", model_dir)
        [b_tier] = [t for t in reader.segments.tiers if t.name == "disk"]  # type: ignore[attr-defined]
        assert b_tier.path != a_tier.path
        assert copy_files(a_tier, b_tier) >= 1
        reader = engine_on(tmp_path / "kv", model_dir)  # a restart finds the copies
        got = doc_call(reader, "Which ships came?")
        fresh = doc_call(
            engine_on(tmp_path / f"fresh-{model_dir.name}", model_dir), "Which ships came?"
        )
        assert got.stats.relocated_tokens == 0 and got.text == fresh.text


# --- the seal -----------------------------------------------------------------------------


def forge(path: Path, edit, key: bytes | None) -> Path:
    """Rewrite ``path``'s metadata with ``edit`` and reseal it with ``key`` (None: the old
    unkeyed sha256 form); saved under the name of the key it now claims."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    head = json.loads(data[8 : 8 + n])
    meta = json.loads(head["__metadata__"]["kvshare"])
    edit(meta)
    text = json.dumps(meta, separators=(",", ":"))
    body = data[8 + n :]
    if key is None:
        import hashlib

        head["__metadata__"] = {
            "kvshare": text,
            "hmac": hashlib.sha256(text.encode() + body).hexdigest(),
        }
    else:
        head["__metadata__"] = {"kvshare": text, "hmac": Sealer(key).seal([text.encode(), body])}
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    scope = Scope(**{k: meta["scope"][k] for k in ("kind", "tenant", "session", "anonymous")})
    out = path.with_name(file_name(scope, meta["content_hash"]))
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return out


def to_tenant_b(meta: dict) -> None:
    meta["scope"]["tenant"] = "B"


def test_a_file_edited_to_name_another_tenant_is_never_served(tmp_path):
    tier, s = DiskTier(tmp_path, 1 << 20, IDENTITY), seg()
    tier.put(s)
    as_b = seg(TENANT_B)
    for key in (None, os.urandom(32)):  # unkeyed checksum, or sealed with a guessed secret
        forge(path_of(tier, s), to_tenant_b, key)
        again = DiskTier(tmp_path, 1 << 20, IDENTITY)
        assert as_b.key in again  # indexed by its header ...
        assert again.get(as_b.key, as_b.tokens) is None and again.corrupt == 1  # ... never served
    secret = (tmp_path / KEY_FILE).read_bytes()  # whoever holds the secret may write entries
    forge(path_of(tier, s), to_tenant_b, secret)
    assert exact(DiskTier(tmp_path, 1 << 20, IDENTITY).get(as_b.key, as_b.tokens), s)


def test_another_stores_files_fail_its_seal(tmp_path):
    one, two = (
        DiskTier(tmp_path / "one", 1 << 20, IDENTITY),
        DiskTier(tmp_path / "two", 1 << 20, IDENTITY),
    )
    s = seg()
    one.put(s)
    shutil.copy(path_of(one, s), path_of(two, s))
    assert (tmp_path / "one" / KEY_FILE).read_bytes() != (tmp_path / "two" / KEY_FILE).read_bytes()
    two = DiskTier(tmp_path / "two", 1 << 20, IDENTITY)  # indexed from its header at open
    assert s.key in two and two.get(s.key, s.tokens) is None and two.corrupt == 1


def test_the_key_file_is_owner_only_and_checked(tmp_path):
    DiskTier(tmp_path, 1 << 20, IDENTITY)
    key = tmp_path / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_size == 32
    key.chmod(0o644)
    with pytest.raises(CacheDirError, match="chmod 600"):
        DiskTier(tmp_path, 1 << 20, IDENTITY)
    key.chmod(0o600)
    key.write_bytes(b"short")
    with pytest.raises(CacheDirError, match="5 bytes"):
        DiskTier(tmp_path, 1 << 20, IDENTITY)
    key.unlink()
    key.mkdir()
    with pytest.raises(CacheDirError, match="not a regular file"):
        DiskTier(tmp_path, 1 << 20, IDENTITY)
    key.rmdir()
    real = tmp_path / "real.key"
    real.write_bytes(os.urandom(32))
    real.chmod(0o600)
    key.symlink_to(real)
    with pytest.raises(CacheDirError, match="cannot open"):  # never through a symlink
        DiskTier(tmp_path, 1 << 20, IDENTITY)


def test_an_operators_key_file_seals_the_tier(tmp_path):
    key = tmp_path / "secret.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    tier, s = DiskTier(tmp_path / "kv", 1 << 20, IDENTITY, key_file=key), seg()
    tier.put(s)
    assert not (tmp_path / "kv" / KEY_FILE).exists()
    assert exact(DiskTier(tmp_path / "kv", 1 << 20, IDENTITY, key_file=key).get(s.key, s.tokens), s)
    assert DiskTier(tmp_path / "kv", 1 << 20, IDENTITY).get(s.key, s.tokens) is None  # other key


# --- what a directory may hold ------------------------------------------------------------


def replace_with(path: Path, kind: str, target: Path | None = None) -> None:
    path.unlink()
    if kind == "dir":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "link":
        assert target is not None
        path.symlink_to(target)


@pytest.mark.parametrize("kind", ["dir", "fifo", "link"])
@pytest.mark.parametrize("when", ["at open", "at lookup"])
def test_no_regular_file_where_a_segment_was_is_skipped_never_raised_or_waited_on(
    tmp_path, kind, when
):
    tier, s, other = DiskTier(tmp_path, 1 << 20, IDENTITY), seg(), seg(name="h1", seed=1)
    tier.put(s)
    tier.put(other)
    replace_with(path_of(tier, s), kind, target=path_of(tier, other))  # a link to a valid file
    if when == "at open":
        tier = within(10, DiskTier, tmp_path, 1 << 20, IDENTITY)
        assert s.key not in tier and tier.skipped == 1
    assert within(10, tier.get, s.key, s.tokens) is None
    assert (
        tier.skipped == 1
        and tier.corrupt == 0
        and path_of(tier, s).is_symlink() == (kind == "link")
    )
    assert os.path.lexists(path_of(tier, s))  # not ours: left alone
    assert exact(tier.get(other.key, other.tokens), other)
    assert within(10, lambda: DiskTier(tmp_path, 1 << 20, IDENTITY).listing()) is not None


def test_an_unreadable_file_is_skipped(tmp_path, monkeypatch):
    tier, s = DiskTier(tmp_path, 1 << 20, IDENTITY), seg()
    tier.put(s)
    real, denied = os.open, str(path_of(tier, s))

    def no_access(path, *args, **kwargs):
        if str(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_access)
    assert tier.get(s.key, s.tokens) is None and tier.skipped == 1
    again = DiskTier(tmp_path, 1 << 20, IDENTITY)
    assert s.key not in again and again.skipped == 1 and Path(denied).exists()


def test_a_full_disk_is_a_counted_refusal_and_the_call_goes_on(tiny_dirs, tmp_path, monkeypatch):
    e = engine_on(tmp_path, Path(tiny_dirs["llama"]))
    [disk] = [t for t in e.segments.tiers if t.name == "disk"]  # type: ignore[attr-defined]
    real = os.write

    def enospc(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(disk.path)):
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", enospc)
    r = doc_call(e, "Which ships?")
    assert r.stats.prompt_tokens > 0 and disk.write_errors >= 1 and len(disk) == 0
    assert [p for p in disk.path.iterdir()] == []  # no temporary left behind


def test_a_directory_that_cannot_be_written_is_a_named_error_at_open(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheDirError):
        DiskTier(tmp_path / "file", 1 << 20, IDENTITY)
    elsewhere = DiskTier(tmp_path / "elsewhere", 1 << 20, IDENTITY)
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / elsewhere.path.name).symlink_to(elsewhere.path)
    with pytest.raises(CacheDirError, match="symlink"):
        DiskTier(planted, 1 << 20, IDENTITY)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only mount (as root,
    with pytest.raises(CacheDirError, match="not writable"):  # mode bits do not stop writes)
        DiskTier(tmp_path / "ro", 1 << 20, IDENTITY)


# --- the corruption campaign --------------------------------------------------------------

EDITS = {
    "tenant": lambda m: m["scope"].update(tenant="B"),
    "session": lambda m: m["scope"].update(session="s2"),
    "kind": lambda m: m["scope"].update(kind="global"),
    "tokens": lambda m: m.update(tokens=[t + 1 for t in m["tokens"]]),
    "content_hash": lambda m: m.update(content_hash="h9"),
    "model": lambda m: m.update(model="0" * 32),
    "version": lambda m: m.update(version=1),
    "dtype": lambda m: m.update(dtype="F16"),
    "shape": lambda m: m.update(shape=[m["shape"][1], m["shape"][0], *m["shape"][2:]]),
    "agent": lambda m: m.update(agent="intruder"),
}


def campaign_cases(original: bytes, spare: bytes, foreign: bytes) -> dict[str, object]:
    """name -> new bytes for the file, or a ('replace', kind) / ('forge', edit, key) action."""
    cases: dict[str, object] = {}
    for i in range(0, len(original), max(1, len(original) // 200)):
        cases[f"flip byte {i}"] = original[:i] + bytes([original[i] ^ 0x10]) + original[i + 1 :]
    for cut in range(0, len(original), max(1, len(original) // 20)):
        cases[f"truncated to {cut}"] = original[:cut]
    cases.update({
        "appended 1": original + b"\0", "appended 8": original + b"x" * 8,
        "zeros": bytes(len(original)), "another segment's file": spare,
        "another model's file": foreign, "header length huge": b"\xff" * 8 + original[8:],
        "header length 0": bytes(8) + original[8:],
        "header length past the end": struct.pack("<Q", len(original)) + original[8:],
    })  # fmt: skip
    for kind in ("dir", "fifo", "link"):
        cases[f"replaced by a {kind}"] = ("replace", kind)
    for name in EDITS:
        for how in ("sha256", "guessed key", "not resealed"):
            cases[f"edited {name}, {how}"] = ("forge", name, how)
    return cases


def reseal_not(path: Path, original: bytes, edit) -> None:
    """``edit`` applied to the metadata, the old seal kept."""
    (n,) = struct.unpack("<Q", original[:8])
    head = json.loads(original[8 : 8 + n])
    meta = json.loads(head["__metadata__"]["kvshare"])
    edit(meta)
    head["__metadata__"]["kvshare"] = json.dumps(meta, separators=(",", ":"))
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + original[8 + n :])


def apply(action: object, path: Path, original: bytes, spare: Path) -> None:
    """Put case ``action`` in place of the file at ``path``."""
    if isinstance(action, bytes):
        path.write_bytes(action)
        return
    assert isinstance(action, tuple)
    if action[0] == "replace":
        replace_with(path, action[1], target=spare)
        return
    _, edit, how = action
    if how == "not resealed":
        reseal_not(path, original, EDITS[edit])
        return
    claimed = forge(path, EDITS[edit], None if how == "sha256" else os.urandom(32))
    if claimed != path:
        path.unlink()


def test_corruption_campaign_serves_no_wrong_kv_and_raises_nothing(tmp_path):
    """Every case twice: on a live tier that indexed the good file, and after a restart.
    Reads: the original key, and every key an edit may claim."""
    tokens = tuple(range(40))
    big = StoredSegment(TENANT_A, "h0", tokens, kv_for(tokens), "prompt", "user", "w", 0)
    spare = seg(name="h1", n=40, seed=7)
    pristine = tmp_path / "pristine"
    tier = DiskTier(pristine, 1 << 22, IDENTITY)
    tier.put(big)
    tier.put(spare)
    other = DiskTier(tmp_path / "other", 1 << 22, OTHER_MODEL)
    other.put(big)
    original = path_of(tier, big).read_bytes()
    foreign = path_of(other, big).read_bytes()
    cases = campaign_cases(original, path_of(tier, spare).read_bytes(), foreign)
    keys = [(big.key, tokens), ((TENANT_B, "h0"), tokens), ((Scope("global"), "h0"), tokens)]
    keys += [((TENANT_A, "h9"), tokens), (big.key, tuple(t + 1 for t in tokens))]
    keys += [((Scope("tenant", "A", "s2"), "h0"), tokens), (spare.key, spare.tokens)]
    counts = {"reads": 0, "wrong": 0, "raw": 0, "intact": 0, "refused": 0}
    for i, (name, action) in enumerate(cases.items()):
        base = tmp_path / f"case-{i}"
        shutil.copytree(pristine, base, symlinks=True)
        live = DiskTier(base, 1 << 22, IDENTITY)
        path = path_of(live, big)
        apply(action, path, original, path_of(live, spare))
        for tier_of in (lambda t=live: t, lambda b=base: DiskTier(b, 1 << 22, IDENTITY)):
            try:
                opened = within(10, tier_of)
                results = [within(10, opened.get, k, t) for k, t in keys]
            except Exception as exc:  # a raw error: counted, reported below
                counts["raw"] += 1
                print(f"raw error in case {name!r}: {type(exc).__name__}: {exc}")
                continue
            for (key, _), got in zip(keys, results, strict=True):
                counts["reads"] += 1
                want = {big.key: big, spare.key: spare}.get(key)
                if got is None:
                    counts["refused"] += 1
                elif want is not None and got.key == key and exact(got, want):
                    counts["intact"] += 1
                else:
                    counts["wrong"] += 1
                    print(f"wrong KV served in case {name!r} for {key}")
        shutil.rmtree(base)
    print(  # shown with -s
        f"\ncorruption campaign: {len(cases)} cases, {counts['reads']} reads: "
        f"{counts['wrong']} wrong KV served, {counts['raw']} raw errors, "
        f"{counts['refused']} refused, {counts['intact']} served intact"
    )
    assert counts["wrong"] == 0 and counts["raw"] == 0
    assert counts["reads"] == 2 * len(cases) * len(keys)
