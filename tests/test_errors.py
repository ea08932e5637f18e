"""How a script ends on an error a user can fix (msmarco/errors.py): its message and exit code 1, no traceback; an
interrupt with how to resume; any other exception keeps its traceback."""
import errno

import pytest

from msmarco import errors


def _exit(exc, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        with errors.user_errors():
            raise exc
    return e.value.code, capsys.readouterr().err


def test_user_errors_end_with_their_message(capsys):
    code, err = _exit(errors.DataError("file x is damaged: fetch it again"), capsys)
    assert code == 1 and err == "error: file x is damaged: fetch it again\n"


def test_an_interrupt_says_how_to_resume(capsys):
    code, err = _exit(KeyboardInterrupt(), capsys)
    assert code == 130 and "rerun the same command to resume" in err


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOTDIR])
def test_a_folder_that_cannot_be_written_is_named(code, capsys):
    exit_code, err = _exit(OSError(code, "refused", "/out/metrics.jsonl"), capsys)
    assert exit_code == 1 and "cannot write /out/metrics.jsonl" in err and "--output_dir" in err


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "I/O error", "/x"), OSError(errno.EACCES, "no file named"),
                                 ValueError("a bug"), KeyError("a bug")])
def test_other_exceptions_keep_their_traceback(exc):
    with pytest.raises(type(exc)):
        with errors.user_errors():
            raise exc
