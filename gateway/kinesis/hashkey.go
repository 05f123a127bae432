package kinesis

import (
	"crypto/md5"
	"encoding/binary"
	"fmt"
	"math/big"
)

// hashKey is an unsigned 128-bit hash key: Kinesis maps a partition key to
// the big-endian value of its MD5 digest.
type hashKey struct{ hi, lo uint64 }

var (
	maxHashKey = hashKey{^uint64(0), ^uint64(0)}
	two128     = new(big.Int).Lsh(big.NewInt(1), 128)
)

// md5Key is the hash key of a partition key.
func md5Key(partitionKey string) hashKey {
	sum := md5.Sum([]byte(partitionKey))
	return hashKey{binary.BigEndian.Uint64(sum[:8]), binary.BigEndian.Uint64(sum[8:])}
}

func (k hashKey) cmp(o hashKey) int {
	switch {
	case k.hi < o.hi:
		return -1
	case k.hi > o.hi:
		return 1
	case k.lo < o.lo:
		return -1
	case k.lo > o.lo:
		return 1
	}
	return 0
}

// inc and dec wrap around; callers check the bounds first.
func (k hashKey) inc() hashKey {
	if k.lo == ^uint64(0) {
		return hashKey{k.hi + 1, 0}
	}
	return hashKey{k.hi, k.lo + 1}
}

func (k hashKey) dec() hashKey {
	if k.lo == 0 {
		return hashKey{k.hi - 1, ^uint64(0)}
	}
	return hashKey{k.hi, k.lo - 1}
}

func (k hashKey) big() *big.Int {
	b := new(big.Int).SetUint64(k.hi)
	b.Lsh(b, 64)
	return b.Or(b, new(big.Int).SetUint64(k.lo))
}

func fromBig(b *big.Int) hashKey {
	lo := new(big.Int).And(b, new(big.Int).SetUint64(^uint64(0)))
	hi := new(big.Int).Rsh(b, 64)
	return hashKey{hi.Uint64(), lo.Uint64()}
}

// String is the decimal form Kinesis uses on the wire.
func (k hashKey) String() string { return k.big().String() }

// parseHashKey parses a decimal hash key in [0, 2^128-1].
func parseHashKey(s string) (hashKey, error) {
	if s == "" || len(s) > 39 {
		return hashKey{}, fmt.Errorf("hash key %q is not a decimal number in [0, 2^128-1]", s)
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return hashKey{}, fmt.Errorf("hash key %q is not a decimal number in [0, 2^128-1]", s)
		}
	}
	b, ok := new(big.Int).SetString(s, 10)
	if !ok || b.Cmp(two128) >= 0 {
		return hashKey{}, fmt.Errorf("hash key %q is not a decimal number in [0, 2^128-1]", s)
	}
	return fromBig(b), nil
}

// uniformBound is floor(i * 2^128 / n): the start of the i-th of n equal
// hash key ranges (i = n gives 2^128, which callers never store).
func uniformBound(i, n int) hashKey {
	b := new(big.Int).Mul(two128, big.NewInt(int64(i)))
	b.Div(b, big.NewInt(int64(n)))
	if b.Cmp(two128) >= 0 {
		return maxHashKey
	}
	return fromBig(b)
}
