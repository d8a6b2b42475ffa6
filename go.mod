module github.com/ftkvm/ftkvm

go 1.26.8

require (
	github.com/alecthomas/kong v1.17.0
	github.com/sirupsen/logrus v1.10.2
	golang.org/x/arch v0.33.0
	golang.org/x/sys v0.50.0
	golang.org/x/term v0.48.0
)
