"""Entry for the download rule (stub: to be implemented)."""
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    raise NotImplementedError("download")


if __name__ == "__main__":
    run(main, "download")
