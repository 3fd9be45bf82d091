"""Nothing lost: an adapter directory is replaced whole, through crashes, full disks, concurrent
writers and readers; the place is checked before training; overwriting needs consent.

Crashes are real (a forked child killed with ``os._exit`` at the k-th file-system step of a save,
for every k), writers and readers are real processes and threads, the full disk is a real
tmpfs where the machine lets us mount one.
"""

import contextlib
import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_lora.atomic as atomic
import lightning_lora.io as lora_io
import lightning_lora.preflight as preflight
from lightning_lora import AdapterFileError, inject_lora, load_adapter, lora_parameters, read_adapter, save_adapter
from lightning_lora.errors import AdapterSaveError
from lightning_lora.preflight import adapter_bytes, check_adapter_dir

REPO = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        torch.manual_seed(0)
        self.query, self.value, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 3)


def adapted(value: float, r: int = 2, d: int = 16) -> Net:
    """A model whose adapter is recognisable: every A and B entry equals ``value``, and so does
    ``alpha``; a torn pair (one save's config, another's weights, or a header paired with other
    bytes) cannot pass :func:`whole`."""
    model = Net(d)
    inject_lora(model, r=r, alpha=value, target_modules=["query", "value"])
    with torch.no_grad():
        for p in lora_parameters(model):
            p.fill_(value)
    return model


def whole(directory: Path) -> float:
    """The value of the adapter in ``directory``, checking that both files are of one save."""
    adapter = read_adapter(directory)
    alpha = adapter.config["lora_alpha"]
    for A, B in adapter.pairs.values():
        assert torch.all(alpha == A) and torch.all(alpha == B), f"torn adapter: alpha {alpha}, A {A.flatten()[:3]}"
    return alpha


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.parent.glob(f".{directory.name}.*"))


# ------------------------------------------------------------------------- crash at any instant

# Every file-system step a save takes; the child dies right before the k-th one.
STEPS = [
    (os, "mkdir"),
    (os, "rename"),
    (os, "replace"),
    (os, "fsync"),
    (os, "chmod"),
    (os, "rmdir"),
    (os, "unlink"),
    (shutil, "rmtree"),
    (atomic, "_exchange"),
    (lora_io, "save_file"),
    (pathlib.Path, "write_text"),
]


def save_dying_at(step: int, model: nn.Module, directory: Path) -> int:
    """Fork; the child saves ``model`` to ``directory`` and ``os._exit(137)``s right before its
    ``step``-th file-system step (as ``kill -9`` would: no ``finally`` runs). Returns the child's
    exit status: 137 if it died, 0 if the save finished first."""
    pid = os.fork()
    if pid == 0:  # the child
        try:
            count = [0]

            def dying(original):
                def step_or_die(*args, **kwargs):
                    count[0] += 1
                    if count[0] == step:
                        os._exit(137)
                    return original(*args, **kwargs)

                return step_or_die

            for owner, name in STEPS:
                setattr(owner, name, dying(getattr(owner, name)))
            save_adapter(model, directory)
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_kill_at_any_step_of_a_save_leaves_the_old_or_the_new_adapter_and_the_next_save_cleans_up(tmp_path):
    old, new = adapted(1.0), adapted(2.0)
    seen = []
    for step in range(1, 200):
        directory = tmp_path / f"run{step}" / "adapter"
        save_adapter(old, directory)
        (directory / "README.md").write_text("the user's notes")  # not ours: must survive
        status = save_dying_at(step, new, directory)
        assert status in (0, 137), f"the save itself failed at step {step}"
        seen.append(whole(directory))  # old or new, never a mix, never missing
        save_adapter(new, directory)  # the next save finishes the job and removes the leftovers
        assert whole(directory) == 2.0 and leftovers(directory) == []
        assert (directory / "README.md").read_text() == "the user's notes"
        if status == 0:
            break
    else:
        pytest.fail("the save never finished")
    assert seen[0] == 1.0 and seen[-1] == 2.0 and set(seen) == {1.0, 2.0}
    assert step > 10  # the enumeration really went through the save's steps


def failing_at(step: int, count: list[int], original):
    def step_or_fail(*args, **kwargs):
        count[0] += 1
        if count[0] == step:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    return step_or_fail


def test_a_failure_at_any_step_leaves_the_previous_adapter_and_no_temporary_directory(tmp_path, monkeypatch):
    """The same enumeration with an OSError (ENOSPC, say) instead of a kill: ``finally`` runs,
    so nothing is left behind, and the previous adapter is untouched until the swap."""
    old, new = adapted(1.0), adapted(2.0)
    directory = tmp_path / "adapter"
    for step in range(1, 200):
        save_adapter(old, directory)
        before = {p.name: p.read_bytes() for p in directory.iterdir()}
        count = [0]
        with monkeypatch.context() as patch:
            for owner, name in STEPS:
                patch.setattr(owner, name, failing_at(step, count, getattr(owner, name)))
            with contextlib.suppress(OSError):
                save_adapter(new, directory)
        value = whole(directory)
        if value == 1.0:  # failed before the swap: nothing changed, nothing left
            assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
            assert leftovers(directory) == []
        if count[0] < step:  # the save finished before reaching the step that fails
            break
    assert whole(directory) == 2.0 and step > 10


def test_a_full_disk_on_the_config_write_keeps_the_previous_adapter(tmp_path, monkeypatch):
    directory = tmp_path / "adapter"
    save_adapter(adapted(1.0), directory)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    real = pathlib.Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "adapter_config.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(adapted(2.0), directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert whole(directory) == 1.0 and leftovers(directory) == []


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 kB file system (tmpfs), where this machine lets us mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_keeps_the_previous_adapter_and_is_seen_before_training(small_disk):
    directory = small_disk / "adapter"
    save_adapter(adapted(1.0, d=16), directory)
    big = adapted(2.0, r=64, d=256)  # 2 × 2 × 64 × 256 floats: 262 kB, more than is free
    with pytest.raises(OSError) as error:
        save_adapter(big, directory)
    assert error.value.errno == errno.ENOSPC
    assert whole(directory) == 1.0 and leftovers(directory) == []
    load_adapter(Net(), directory)
    with pytest.raises(AdapterSaveError, match=r"needs about 262 kB and .* has 2[0-5]\d kB free"):
        check_adapter_dir(small_disk / "other", needed_bytes=adapter_bytes(big))


# ------------------------------------------------------------------------ concurrent writers

WRITER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from lightning_lora import inject_lora, lora_parameters, save_adapter

    directory, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for value in range(first, first + count):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
        inject_lora(model, r=2, alpha=float(value), target_modules=["0", "1"])
        with torch.no_grad():
            for p in lora_parameters(model):
                p.fill_(float(value))
        save_adapter(model, directory)
    """
)


def test_writer_processes_are_serialised_and_a_reader_process_never_sees_a_torn_adapter(tmp_path):
    directory = tmp_path / "adapter"
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(directory), str(100 * (i + 1)), "15"], cwd=REPO)
        for i in range(3)
    ]
    values, errors = set(), []
    while any(w.poll() is None for w in writers):  # this process reads while they write
        try:
            values.add(whole(directory))
        except AdapterFileError as err:
            if "does not exist" not in str(err):  # before the first save lands
                errors.append(str(err))
    assert [w.wait() for w in writers] == [0, 0, 0]
    assert errors == []
    assert len(values) > 3  # the reader really raced the writers
    assert whole(directory) in {114.0, 214.0, 314.0}  # some writer's last save, whole
    assert leftovers(directory) == []


def test_threads_of_one_process_saving_to_one_directory_do_not_collide(tmp_path):
    directory = tmp_path / "adapter"
    models = {v: adapted(float(v)) for v in range(1, 9)}
    failures = []

    def save(values):
        for v in values:
            try:
                save_adapter(models[v], directory)
            except Exception as err:
                failures.append(repr(err))

    threads = [
        threading.Thread(target=save, args=([1, 2, 3, 4] * 3,)),
        threading.Thread(target=save, args=([5, 6, 7, 8] * 3,)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert whole(directory) in {4.0, 8.0} and leftovers(directory) == []


def test_a_reader_racing_a_save_gets_one_whole_version(tmp_path, monkeypatch):
    """Deterministic race: between the reader's two files, a save swaps the directory."""
    directory = tmp_path / "adapter"
    save_adapter(adapted(1.0), directory)
    real_read_at, raced = atomic._read_at, []

    def read_then_race(fd, path, name, limit):
        data = real_read_at(fd, path, name, limit)
        if not raced:
            raced.append(name)
            save_adapter(adapted(2.0), directory)
        return data

    monkeypatch.setattr(atomic, "_read_at", read_then_race)
    assert whole(directory) in (1.0, 2.0)
    assert raced == ["adapter_config.json"]


def test_a_directory_in_place_of_the_config_is_refused_before_anything_changes(tmp_path):
    directory = tmp_path / "adapter"
    save_adapter(adapted(1.0), directory)
    (directory / "adapter_config.json").unlink()
    (directory / "adapter_config.json").mkdir()
    weights = (directory / "adapter_model.safetensors").read_bytes()
    with pytest.raises(AdapterSaveError, match=r"adapter_config\.json' is not a file; remove it"):
        save_adapter(adapted(2.0), directory)
    assert (directory / "adapter_model.safetensors").read_bytes() == weights


def test_a_symlinked_adapter_directory_stays_a_symlink(tmp_path):
    real = tmp_path / "real"
    save_adapter(adapted(1.0), real)
    (tmp_path / "link").symlink_to(real)
    save_adapter(adapted(2.0), tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and whole(tmp_path / "link") == 2.0 and whole(real) == 2.0


def test_without_an_atomic_exchange_the_gap_is_an_absent_directory_and_a_crash_in_it_is_recovered(
    tmp_path, monkeypatch
):
    """Where renameat2 is missing (macOS, Windows, some file systems): two renames. A crash
    between them leaves ``path`` absent and the previous adapter under a clear name; a reader
    says where, and the next save puts it back before replacing it."""
    monkeypatch.setattr(atomic, "_exchange", lambda *args: False)
    directory = tmp_path / "adapter"
    save_adapter(adapted(1.0), directory)
    save_adapter(adapted(2.0), directory)
    assert whole(directory) == 2.0 and leftovers(directory) == []

    real_rename, renames = os.rename, []

    def crash_after_moving_aside(src, dst):
        real_rename(src, dst)
        renames.append(dst)
        if ".previous-" in str(dst):
            raise KeyboardInterrupt  # as if killed here; the previous version is aside

    monkeypatch.setattr(os, "rename", crash_after_moving_aside)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(adapted(3.0), directory)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not directory.exists()
    with pytest.raises(
        AdapterFileError, match=r"A save was interrupted: the previous version is in '.*\.adapter\.previous-"
    ):
        read_adapter(directory)
    save_adapter(adapted(4.0), directory)
    assert whole(directory) == 4.0 and leftovers(directory) == []


# ------------------------------------------------------------------------ before training


def test_an_unwritable_adapter_dir_is_refused_before_training_with_the_fix(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        AdapterSaveError, match=r"'.*/file' is a file\. Choose a directory path, or move that file away"
    ):
        check_adapter_dir(tmp_path / "file")
    with pytest.raises(
        AdapterSaveError, match=r"'.*/file' is a file, so '.*/file/sub/adapter' cannot be created under it"
    ):
        check_adapter_dir(tmp_path / "file" / "sub" / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # a check creates nothing
    assert check_adapter_dir(tmp_path / "new" / "adapter") == tmp_path / "new" / "adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_read_only_file_system_is_refused_before_training(small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(AdapterSaveError, match=r"is not writable: it is on a read-only file system"):
        check_adapter_dir(small_disk / "adapter")


def test_a_directory_this_user_may_not_write_is_refused_before_training(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anywhere (and so would its save): inject what another user gets
        monkeypatch.setattr(
            preflight.tempfile, "mkdtemp", lambda **kw: (_ for _ in ()).throw(PermissionError(13, "denied"))
        )
    with pytest.raises(AdapterSaveError, match=r"'.*/locked' is not writable: this user may not write there \(check"):
        check_adapter_dir(locked / "adapter")


def test_a_second_save_into_an_adapter_dir_needs_overwrite(tmp_path):
    directory = tmp_path / "adapter"
    first = adapted(1.0)
    save_adapter(first, directory)
    with pytest.raises(
        AdapterSaveError, match=r"already holds an adapter \(saved .*\); saving this fit's adapter there"
    ):
        check_adapter_dir(directory)
    assert check_adapter_dir(directory, overwrite=True) == directory
    check_adapter_dir(directory / "elsewhere")  # a new place is fine


def test_a_refusal_after_a_merge_says_the_new_adapter_only_fits_the_merged_weights(tmp_path):
    from lightning_lora import merge_lora

    directory = tmp_path / "adapter"
    model = adapted(1.0)
    save_adapter(model, directory)
    merge_lora(model)
    with pytest.raises(AdapterSaveError, match=r"This model's weights already hold a merged adapter"):
        check_adapter_dir(directory, model=model)


def test_an_adapter_saved_after_a_merge_says_so_and_loading_it_without_that_merge_warns(tmp_path):
    from lightning_lora import unload_lora

    model = adapted(1.0)
    save_adapter(model, tmp_path / "first")
    unload_lora(model, merge=True)  # a fit's end
    inject_lora(model, r=2, target_modules=["query", "value"], init="gaussian")  # a second fit
    save_adapter(model, tmp_path / "second")
    extras = read_adapter(tmp_path / "second").extras
    assert set(extras["merged_into_base"]) == {"query", "value"}
    with pytest.warns(UserWarning, match=r"was trained on weights into which other adapter\(s\) had been merged"):
        load_adapter(Net(), tmp_path / "second")
    base = Net()
    load_adapter(base, tmp_path / "first")
    unload_lora(base, merge=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(base, tmp_path / "second")  # on the merged base it belongs to: no warning


def test_saved_files_are_plain_json_and_safetensors(tmp_path):
    directory = save_adapter(adapted(1.0), tmp_path / "adapter")
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((directory / "adapter_config.json").read_text())["lora_alpha"] == 1.0
