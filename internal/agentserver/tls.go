package agentserver

import (
	"os"
	"path/filepath"

	"skiff.dev/skiff/internal/pki"
)

// haveTLS reports whether dir holds the CA certificate, the node
// certificate and its key.
func haveTLS(dir string) bool {
	for _, f := range []string{pki.CAFile, pki.CertFile, pki.KeyFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			return false
		}
	}
	return true
}
