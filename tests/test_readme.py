"""What README.md shows runs as shown: the greeter it prints is the shipped one, and its
three-line test example passes quietly."""
from __future__ import annotations

import logging

import pytest

import zrpc
from workers.greeter import Greeter, helloworld_pb2
from zrpc.testing import serve

from .conftest import REPO

README = (REPO / "README.md").read_text()


def python_block(first_line: str) -> str:
    """The body of README's ```python block whose first line is ``first_line``."""
    start = README.index(f"```python\n{first_line}\n") + len("```python\n")
    return README[start:README.index("```\n", start)]


def test_readme_greeter_is_the_shipped_workers_greeter_service():
    shown = python_block("# workers/greeter/service.py")
    shipped = (REPO / "workers" / "greeter" / "service.py").read_text()
    assert shown == "# workers/greeter/service.py\n" + shipped


def test_greeter_refuses_an_empty_name_as_readme_says():
    with serve(Greeter()) as client:
        greeter = client.stub(helloworld_pb2.DESCRIPTOR.services_by_name["Greeter"])
        with pytest.raises(zrpc.Error) as raised:
            greeter.SayHello(helloworld_pb2.HelloRequest(name=""))
    # README prints: INVALID_ARGUMENT name must not be empty
    assert (raised.value.code.name, raised.value.message) == ("INVALID_ARGUMENT", "name must not be empty")


def test_readme_testing_example_passes_and_exits_without_a_warning(caplog):
    example = python_block("from zrpc.testing import serve")
    namespace = {"Greeter": Greeter, "helloworld_pb2": helloworld_pb2}
    exec(compile(example, "README.md", "exec"), namespace)
    with caplog.at_level(logging.WARNING):
        namespace["test_greeter"]()
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
