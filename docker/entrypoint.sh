#!/bin/sh
# The image's entrypoint, run under tini (PID 1: forwards signals, reaps). Every mode `exec`s, so the Python
# process is tini's child and gets SIGTERM itself (watch, worker and serve finish the items in hand and exit 0).
#
#   watch | worker | serve | upscale | info | models ARGS   superres MODE ARGS
#   lambda [HANDLER]       the AWS Lambda Runtime Interface Client on handler.lambda_function.handler
#   (no arguments)         lambda inside AWS Lambda (AWS_LAMBDA_RUNTIME_API is set), else info
#   healthcheck            the image's HEALTHCHECK: GET /healthz in watch, worker and serve; other modes: healthy
#   anything else          passed to superres as is (e.g. --help)
set -eu

LAMBDA_HANDLER=handler.lambda_function.handler

if [ $# -eq 0 ]; then
  if [ -n "${AWS_LAMBDA_RUNTIME_API:-}" ]; then set -- lambda; else set -- info; fi
fi

case "$1" in
  lambda)
    exec python -m awslambdaric "${2:-$LAMBDA_HANDLER}"
    ;;
  healthcheck)
    # the mode this container runs: the word after the entrypoint in PID 1's command line (tini -- ENTRYPOINT MODE)
    mode=$(tr '\0' '\n' </proc/1/cmdline | sed -n '/superres-entrypoint$/{n;p;q;}')
    case "$mode" in
      watch | worker) ;;
      serve)
        # the API's own port: --port N / --port=N on the command line, else SUPERRES_PORT, else 8080
        port=$(tr '\0' '\n' </proc/1/cmdline | sed -n '/^--port$/{n;p;q;};s/^--port=//p' | tail -n 1)
        port=${port:-${SUPERRES_PORT:-8080}}
        [ "$port" != 0 ] || exit 0  # a port picked at random: nothing known to probe
        exec python -c 'import os, sys, urllib.request as u; h = os.environ.get("SUPERRES_HOST") or "127.0.0.1"; h = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(h, h); h = "[%s]" % h if ":" in h else h; u.urlopen("http://%s:%s/healthz" % (h, sys.argv[1]), timeout=4)' "$port"
        ;;
      *) exit 0 ;;  # one-shot and Lambda modes serve no /healthz
    esac
    [ "${SUPERRES_METRICS_PORT:-9100}" != 0 ] || exit 0  # metrics server turned off: nothing to probe
    # the address the server binds (SUPERRES_METRICS_HOST); "every interface" is reached on loopback
    exec python -c 'import os, urllib.request as u; h = os.environ.get("SUPERRES_METRICS_HOST") or "127.0.0.1"; h = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(h, h); h = "[%s]" % h if ":" in h else h; u.urlopen("http://%s:%s/healthz" % (h, os.environ.get("SUPERRES_METRICS_PORT", "9100")), timeout=4)'
    ;;
  watch | worker | serve | upscale | info | models)
    exec superres "$@"
    ;;
  *.*)
    # AWS Lambda's ImageConfig.Command given as the handler itself (the usual convention)
    if [ -n "${AWS_LAMBDA_RUNTIME_API:-}" ]; then exec python -m awslambdaric "$1"; fi
    exec superres "$@"
    ;;
  *)
    exec superres "$@"
    ;;
esac
