# A plugin image with dependencies of its own, for plugin authors to copy beside
# their plugin.py: the plugin runtime image (Python and the SDK), the plugin's
# wheels, the plugin's code.
#
# The runtime image has no pip and a build cannot reach a package index, so the
# wheels are built on the host first, pip's own wheel among them:
#
#   python3 -m pip wheel --wheel-dir wheels -r requirements.txt pip
#   docker build -f plugin-with-dependencies.Dockerfile -t NAME:VERSION .
#
# and pip runs from its wheel inside the build. The wheels must suit the image's
# Python (3.11 on Debian bookworm): build them with a Python 3.11 on Linux, or
# fetch binary ones with `pip download --only-binary=:all: --python-version 3.11
# --platform manylinux2014_x86_64`. What the runtime image already holds (grpcio,
# protobuf, the SDK) is not installed again. pip compiles what it installs to
# bytecode here, at build time: plugins run on a read-only root.
ARG RUNTIME_IMAGE=blackhole/plugin-runtime:0.1.0
FROM ${RUNTIME_IMAGE}
USER 0:0
COPY requirements.txt wheels/ /wheels/
RUN pip_wheel=$(ls /wheels/pip-*.whl) \
    && python3 "$pip_wheel/pip" install --no-index --find-links /wheels \
        --break-system-packages --no-cache-dir --root-user-action=ignore \
        --disable-pip-version-check -r /wheels/requirements.txt \
    && rm -rf /wheels
COPY plugin.py /app/plugin.py
USER 65532:65532
CMD ["python3", "/app/plugin.py"]
