#!/usr/bin/env bash
# Download, here, the wheels that scripts/gpu_check.sh installs on the GPU machine, which has no network.
#
#     bash scripts/gpu_wheels.sh            # -> wheels/ (git-ignored; name it in the device run's `carry`)
#
# The device image (Python 3.12, torch 2.11, Triton 3.6, transformers, peft, httpx, anyio, click, h11,
# prometheus-client, uvloop, jinja2, pytest preinstalled) lacks the server's web stack, the grammar
# library and the benchmark's HTTP client: those are listed below, each with the dependencies the image
# does not have, at the versions this repository runs (pyproject.toml). --no-deps: nothing else comes
# along, so a dependency the image lacks must be named here. About 10 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
    # lmservice serve
    fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2 uvicorn==0.54.0 httptools==0.9.0
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    pydantic-settings==2.16.3 python-dotenv==1.2.4
    # structured output
    llguidance==1.9.1
    # benchmarks/serve.py's client
    openai==3.57.0 jiter==0.19.0 sniffio==1.3.1 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
)
rm -rf wheels
# pip matches each manylinux tag exactly: name the ones these packages are built for
python3 -m pip download --quiet --no-deps --only-binary :all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -d wheels "${WHEELS[@]}"
ls wheels | wc -l | xargs echo "wheels:"
du -sh wheels
