import hashlib
import subprocess
import sys

from cai.core.seeding import derive_seed


def test_seed_is_sha256_of_the_parts():
    digest = hashlib.sha256("1234\x1fabc\x1frespond".encode()).digest()
    assert derive_seed(1234, "abc", "respond") == int.from_bytes(digest[:4], "big") & 0x7FFFFFFF == 1590703146


def test_same_in_another_process():
    # str hashes are salted per process; derived seeds must not be
    code = "from cai.core.seeding import derive_seed; print(derive_seed(1234, 'abc', 'respond', 0, 'critic'))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "2046821520"


def test_every_part_matters():
    base = derive_seed(1, "row", "stage", 0)
    assert (
        len(
            {
                base,
                derive_seed(2, "row", "stage", 0),
                derive_seed(1, "row2", "stage", 0),
                derive_seed(1, "row", "stage", 1),
            }
        )
        == 4
    )
