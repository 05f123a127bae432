# skiff: `make run` starts skiff dev with the example function deployed;
# `make test` runs every test (privileged ones too: run it as root).

GO        ?= go
BIN       := $(CURDIR)/bin
TOOLS     := $(BIN)/tools
DATA_DIR  ?=
LISTEN    ?= 127.0.0.1:7070
GOTEST    ?= $(GO) test
TEST_TIMEOUT ?= 25m

export CGO_ENABLED ?= 0

# nats-server for the multi-host tests (a 3-node cluster of real
# processes), at the version go.mod pins.
NATS_SERVER := $(TOOLS)/nats-server

.PHONY: all build run test test-short bench generate check-generate lint tools clean

all: build

build:
	$(GO) build -trimpath -o $(BIN)/skiff ./cmd/skiff
	GOOS=linux $(GO) build -trimpath -tags lambda.norpc -ldflags '-s -w' -o $(BIN)/hello/bootstrap ./examples/hello

run: build
	$(BIN)/skiff dev --listen $(LISTEN) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --deploy hello=$(BIN)/hello

# Everything, including privileged tests (namespaces, cgroups, seccomp):
# SKIFF_PRIVILEGED_TESTS=1 makes them fail rather than skip when not root.
test: $(NATS_SERVER)
	SKIFF_PRIVILEGED_TESTS=1 CGO_ENABLED=1 $(GOTEST) -race -count=1 -timeout $(TEST_TIMEOUT) ./...

test-short:
	$(GOTEST) -short -count=1 ./...

bench: build $(NATS_SERVER)
	GOBIN=$(TOOLS) $(GO) install github.com/aws/aws-lambda-runtime-interface-emulator/cmd/aws-lambda-rie@v0.0.0-20261030222936-bef5c4ba774d
	$(GO) run ./bench -out docs/benchmarks.md

tools: $(NATS_SERVER)
	cd tools && $(GO) build -o $(TOOLS)/ github.com/bufbuild/buf/cmd/buf google.golang.org/protobuf/cmd/protoc-gen-go connectrpc.com/connect/cmd/protoc-gen-connect-go honnef.co/go/tools/cmd/staticcheck

# The eBPF objects need clang and llvm-strip: installed from Debian when
# missing (as root). Regenerated objects are byte-identical for one clang
# version (Debian 12's clang 14 here and in CI).
generate: tools
	find api/gen -name "*.pb.go" -delete -o -name "*.connect.go" -delete
	cd api && PATH=$(TOOLS):$$PATH buf generate
	command -v clang >/dev/null && command -v llvm-strip >/dev/null || { apt-get update -qq && apt-get install -y -qq clang llvm; }
	rm -f ebpf/*_bpfel.go ebpf/*_bpfel.o
	cd ebpf && $(GO) generate ./...

# Fails when the committed generated code is not what `make generate` makes.
check-generate: generate
	@git diff --exit-code --stat -- api/gen ':(glob)ebpf/*_bpfel.*' || { echo "generated code is stale: run make generate and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- api/gen ':(glob)ebpf/*_bpfel.*')" || { echo "untracked generated files: run make generate and commit"; exit 1; }

lint: tools
	$(GO) vet ./...
	$(TOOLS)/staticcheck ./...
	cd api && PATH=$(TOOLS):$$PATH buf lint

$(NATS_SERVER):
	GOBIN=$(TOOLS) CGO_ENABLED=0 $(GO) install github.com/nats-io/nats-server/v2@$$($(GO) list -m -f '{{.Version}}' github.com/nats-io/nats-server/v2)

clean:
	rm -rf $(BIN)
