package wire

import "strconv"

// Type identifies a message in its frame header.
type Type uint8

const (
	TypeHello             Type = 1
	TypeRefuse            Type = 2
	TypeRecord            Type = 3
	TypeEpochEnd          Type = 4
	TypeCheckpoint        Type = 5
	TypeOutput            Type = 6
	TypePerformed         Type = 7
	TypeAck               Type = 8
	TypeCheckpointRequest Type = 9
	TypeHeartbeat         Type = 10
	TypeGoodbye           Type = 11
	TypeDiskData          Type = 12
	TypePageHashes        Type = 13
	typeLimit                  = 14
)

var typeNames = [typeLimit]string{"", "hello", "refuse", "record", "epoch-end", "checkpoint",
	"output", "performed", "ack", "checkpoint-request", "heartbeat", "goodbye", "disk-data", "page-hashes"}

func (t Type) String() string {
	if t > 0 && t < typeLimit {
		return typeNames[t]
	}
	return "type(" + strconv.Itoa(int(t)) + ")"
}

// Msg is one protocol message. The set is closed: the types below.
type Msg interface {
	Type() Type
	appendBody(b []byte) []byte
}

// Hello opens a link, sent by both sides. Its encoding is frozen (new
// fields go at the end, by version) so that any version can read a peer's
// Hello and refuse it politely.
type Hello struct {
	Version uint32 // ProtocolVersion of the sender
	Role    Role
	Policy  Policy // the primary's; a backup sends its own default
	Clock   Clock
	Verify  bool // the primary will send state hashes at epoch ends
	// Started: the primary's guest has already run, so the backup must
	// wait for a full checkpoint instead of booting alongside.
	Started bool
	MemSize uint64 // bytes
	// WallClock is the RTC's time at virtual time zero (Unix ns): an input
	// of the environment that the backup takes from the primary.
	WallClock int64
	Kernel    Digest
	Initrd    Digest
	Cmdline   Digest

	// Version 2 and later.

	// Instance names this replica process (random, drawn at its start):
	// the primary's and the backup's together name the pair, whose
	// survivor the witness picks when the link is lost.
	Instance Digest
	// Witness is the SHA-256 of the witness address the replica claims
	// at, zero for none: both sides must claim at the same witness.
	Witness Digest

	// Version 3 and later: what decides where delivery points fall on a
	// host, beyond the guest (ft/doc.go, "Handshake").

	// Windows: from the primary, its machine requests interrupt windows
	// (an exit where a pending interrupt can be taken is a delivery
	// point); from a backup, its host can place them at points the
	// guest's execution defines, so it can follow a primary that does.
	Windows bool
	// CPU is the SHA-256 of the CPUID table the guest is given: another
	// CPU model or KVM can make the guest take other paths.
	CPU Digest

	// Version 4 and later.

	// Disks are the guest's disks, in order: each replica has its own
	// copy of each image, which must start identical (ft/doc.go,
	// "Handshake"). At most MaxDisks.
	Disks []Disk

	// Version 5 and later.

	// NICs are the guest's network interfaces, in order, by MAC address:
	// the guest's driver reads the address from the device, so both
	// replicas must give the same ones. At most MaxNICs.
	NICs []NIC

	// (Version 6 adds no field: it adds wire.KindDiskDone.)

	// Rest holds the fields of versions after 5, which this version
	// cannot read: a Hello of any later version decodes, and is refused
	// for its version.
	Rest []byte
}

// Disk describes one disk image in a Hello.
type Disk struct {
	Size     uint64 // bytes
	ReadOnly bool
	Digest   Digest // SHA-256 of the image's contents when the replica started
}

// NIC describes one network interface in a Hello.
type NIC struct {
	MAC [6]byte
}

// MaxNICs bounds a Hello's network interface list.
const MaxNICs = 16

// MaxDisks bounds a Hello's disk list.
const MaxDisks = 16

// diskSize is a Disk's encoded size.
const diskSize = 8 + 1 + 32

// Refuse ends a handshake, with the reason.
type Refuse struct {
	Reason RefuseReason
	Text   string
}

// Record is P0: the result of an environment read on the primary.
type Record struct {
	Seq   uint64 // log sequence number, acknowledged by Ack
	Epoch uint64
	Pos   Position
	Kind  Kind
	Value uint64
	Data  []byte // for reads that return buffers (disk, later)
}

// EpochEnd is P2: the epoch ended at Pos, and these events were delivered
// there, after the hash (verify mode) was taken.
type EpochEnd struct {
	Seq   uint64
	Epoch uint64
	Pos   Position
	// Halt: the epoch ended while the guest waited in HLT at Pos (from
	// vmm.Environment.Halt), not when the exit was first offered (At).
	Halt   bool
	Events []Event
	Verify bool   // Hash is set
	Hash   Digest // vCPU registers and guest memory
}

// Checkpoint ends an epoch that has no replayable boundary (the guest ran
// past the kick bound without a guest-caused exit), or starts a backup on
// the primary's state (Full: a joining backup, a repair). State is the
// blob the state-capture code produced; the backup installs it, then
// delivers Events.
type Checkpoint struct {
	Seq   uint64
	Epoch uint64
	Pos   Position // where the primary was: the count at its last exit
	Full  bool     // the complete state, not the pages dirtied since the last one
	// Repair: a page repair (verify mode). The state replaces the
	// diverged backup's, as a full one does, but carries only the pages
	// whose hashes differ from those the backup sent (PageHashes); the
	// rest of its state (registers, devices, machine) is complete.
	Repair bool
	OutSeq uint64 // outputs the guest had produced; all were performed
	// OutBytes: bytes of console output the guest had written since boot
	// (the console stream's length at OutSeq).
	OutBytes uint64
	Events   []Event
	State    []byte
}

// Output announces the primary's output OutSeq before it leaves the
// machine. It is a log record (acknowledged): under both policies the
// output is performed only once the backup holds it, so a promoted backup
// reproduces every output the primary performed.
type Output struct {
	Seq    uint64
	Epoch  uint64
	Pos    Position
	OutSeq uint64
	Done   uint64 // outputs performed up to here (a piggybacked Performed)
	Kind   Kind
	// Offset: for a console output, where its first byte falls in the
	// guest's console stream (bytes of console output written before it).
	Offset uint64
	Data   []byte
}

// Performed confirms that the primary performed every output up to OutSeq.
type Performed struct {
	OutSeq uint64
}

// Ack acknowledges every log record up to Seq (cumulative).
type Ack struct {
	Seq uint64
}

// CheckpointRequest asks the primary for its state: the backup diverged
// at Epoch/Pos and continues from the primary's state. With Pages, the
// backup's page hashes follow (PageHashes) and a page repair will do;
// without, the full state.
type CheckpointRequest struct {
	Epoch  uint64
	Pos    Position
	Pages  bool
	Reason string
}

// Heartbeat keeps a quiet link alive. From the primary it also carries
// progress: every point before Pos was passed in Epoch without ending it.
type Heartbeat struct {
	Epoch uint64
	Pos   Position
}

// Goodbye: the guest ended on the primary with Status. It is a log record.
type Goodbye struct {
	Seq    uint64
	Status int32
}

// DiskData is part of a read-write disk image's contents, sent by a
// primary to a backup that joins its running guest, before the full
// checkpoint (ft/doc.go, "Checkpoint epochs, repair, re-protection"). A
// disk's chunks come in order, from offset 0 to its end; the last carries
// the SHA-256 of the whole image as sent. It is no log record: the full
// checkpoint that follows it is.
type DiskData struct {
	Disk   uint32 // index in Hello.Disks
	Offset uint64 // bytes from the image's start
	Last   bool   // the image's last chunk: Digest is set
	Digest Digest // SHA-256 of the image's contents (with Last)
	Data   []byte // at most MaxDiskData bytes
}

// MaxDiskData bounds a DiskData's contents.
const MaxDiskData = 1 << 20

// PageHashes is part of a diverged backup's memory as hashes, one 64-bit
// hash per 4 KiB page (the first word of the page's SHA-256 in the verify
// hash, ft/driver/memhash.go), sent after a CheckpointRequest with Pages
// and before the repair: the primary sends only the pages whose hashes
// differ from its own (Checkpoint with Repair). The frames come in page
// order from page 0, each at most MaxPageHashes; the last (Last) ends at
// page Total and carries Regs, the hash of the backup's registers. The
// backup's state does not change between these hashes and the repair's
// install: it waits for the repair.
type PageHashes struct {
	Epoch  uint64
	Pos    Position
	First  uint64 // the page number of Hashes[0]
	Total  uint64 // pages of guest memory
	Last   bool
	Regs   Digest   // with Last: SHA-256 of the vCPU registers
	Hashes []uint64 // at most MaxPageHashes
}

// MaxPageHashes bounds a PageHashes frame's hashes (512 KiB).
const MaxPageHashes = 1 << 16

func (Hello) Type() Type             { return TypeHello }
func (Refuse) Type() Type            { return TypeRefuse }
func (Record) Type() Type            { return TypeRecord }
func (EpochEnd) Type() Type          { return TypeEpochEnd }
func (Checkpoint) Type() Type        { return TypeCheckpoint }
func (Output) Type() Type            { return TypeOutput }
func (Performed) Type() Type         { return TypePerformed }
func (Ack) Type() Type               { return TypeAck }
func (CheckpointRequest) Type() Type { return TypeCheckpointRequest }
func (Heartbeat) Type() Type         { return TypeHeartbeat }
func (Goodbye) Type() Type           { return TypeGoodbye }
func (DiskData) Type() Type          { return TypeDiskData }
func (PageHashes) Type() Type        { return TypePageHashes }

// Bodies: little-endian fixed-width integers, bools as one byte 0 or 1,
// byte strings and lists as a 32-bit count then the items. Every valid
// body has exactly one encoding, so decode-then-encode gives back the
// same bytes (the fuzz targets check it).

func (m Hello) appendBody(b []byte) []byte {
	b = le32(b, m.Version)
	b = append(b, byte(m.Role), byte(m.Policy), byte(m.Clock), boolByte(m.Verify), boolByte(m.Started))
	b = le64(b, m.MemSize)
	b = le64(b, uint64(m.WallClock))
	b = append(b, m.Kernel[:]...)
	b = append(b, m.Initrd[:]...)
	b = append(b, m.Cmdline[:]...)
	if m.Version < 2 {
		return b
	}
	b = append(b, m.Instance[:]...)
	b = append(b, m.Witness[:]...)
	if m.Version == 2 {
		return b
	}
	b = append(b, boolByte(m.Windows))
	b = append(b, m.CPU[:]...)
	if m.Version == 3 {
		return b
	}
	b = le32(b, uint32(len(m.Disks)))
	for _, d := range m.Disks {
		b = le64(b, d.Size)
		b = append(b, boolByte(d.ReadOnly))
		b = append(b, d.Digest[:]...)
	}
	if m.Version == 4 {
		return b
	}
	b = le32(b, uint32(len(m.NICs)))
	for _, n := range m.NICs {
		b = append(b, n.MAC[:]...)
	}
	if m.Version == 5 {
		return b // Rest belongs to later versions
	}
	return append(b, m.Rest...)
}

func decodeHello(r *reader) Msg {
	var m Hello
	m.Version = r.u32()
	m.Role = Role(r.u8())
	m.Policy = Policy(r.u8())
	m.Clock = Clock(r.u8())
	m.Verify = r.bool()
	m.Started = r.bool()
	m.MemSize = r.u64()
	m.WallClock = int64(r.u64())
	m.Kernel = r.digest()
	m.Initrd = r.digest()
	m.Cmdline = r.digest()
	if m.Version < 2 || r.bad {
		return m
	}
	// The frozen part ends here: version 1 had nothing more.
	m.Instance = r.digest()
	m.Witness = r.digest()
	if m.Version < 3 || r.bad {
		return m
	}
	m.Windows = r.bool()
	m.CPU = r.digest()
	if m.Version < 4 || r.bad {
		return m
	}
	n := r.u32()
	if n > MaxDisks || uint64(n)*diskSize > uint64(len(r.b)) {
		r.bad = true
		return m
	}
	if n > 0 {
		m.Disks = make([]Disk, n)
		for i := range m.Disks {
			m.Disks[i] = Disk{Size: r.u64(), ReadOnly: r.bool(), Digest: r.digest()}
		}
	}
	if m.Version < 5 || r.bad {
		return m
	}
	n = r.u32()
	if n > MaxNICs || uint64(n)*6 > uint64(len(r.b)) {
		r.bad = true
		return m
	}
	if n > 0 {
		m.NICs = make([]NIC, n)
		for i := range m.NICs {
			copy(m.NICs[i].MAC[:], r.take(6))
		}
	}
	if m.Version > 5 && len(r.b) > 0 && !r.bad {
		// Copied: the decoder reuses its buffer.
		m.Rest = append([]byte(nil), r.take(len(r.b))...)
	}
	return m
}

func (m Refuse) appendBody(b []byte) []byte {
	b = append(b, byte(m.Reason))
	return appendBytes(b, []byte(m.Text))
}

func decodeRefuse(r *reader) Msg {
	var m Refuse
	m.Reason = RefuseReason(r.u8())
	m.Text = string(r.bytes())
	return m
}

func (m Record) appendBody(b []byte) []byte {
	b = le64(b, m.Seq)
	b = le64(b, m.Epoch)
	b = appendPos(b, m.Pos)
	b = append(b, byte(m.Kind))
	b = le64(b, m.Value)
	return appendBytes(b, m.Data)
}

func decodeRecord(r *reader) Msg {
	var m Record
	m.Seq = r.u64()
	m.Epoch = r.u64()
	m.Pos = r.pos()
	m.Kind = Kind(r.u8())
	m.Value = r.u64()
	m.Data = r.bytes()
	return m
}

func (m EpochEnd) appendBody(b []byte) []byte {
	b = le64(b, m.Seq)
	b = le64(b, m.Epoch)
	b = appendPos(b, m.Pos)
	b = append(b, boolByte(m.Halt))
	b = appendEvents(b, m.Events)
	b = append(b, boolByte(m.Verify))
	return append(b, m.Hash[:]...)
}

func decodeEpochEnd(r *reader) Msg {
	var m EpochEnd
	m.Seq = r.u64()
	m.Epoch = r.u64()
	m.Pos = r.pos()
	m.Halt = r.bool()
	m.Events = r.events()
	m.Verify = r.bool()
	m.Hash = r.digest()
	return m
}

func (m Checkpoint) appendBody(b []byte) []byte {
	b = le64(b, m.Seq)
	b = le64(b, m.Epoch)
	b = appendPos(b, m.Pos)
	b = append(b, boolByte(m.Full), boolByte(m.Repair))
	b = le64(b, m.OutSeq)
	b = le64(b, m.OutBytes)
	b = appendEvents(b, m.Events)
	return appendBytes(b, m.State)
}

func decodeCheckpoint(r *reader) Msg {
	var m Checkpoint
	m.Seq = r.u64()
	m.Epoch = r.u64()
	m.Pos = r.pos()
	m.Full = r.bool()
	m.Repair = r.bool()
	m.OutSeq = r.u64()
	m.OutBytes = r.u64()
	m.Events = r.events()
	m.State = r.bytes()
	return m
}

func (m Output) appendBody(b []byte) []byte {
	b = le64(b, m.Seq)
	b = le64(b, m.Epoch)
	b = appendPos(b, m.Pos)
	b = le64(b, m.OutSeq)
	b = le64(b, m.Done)
	b = append(b, byte(m.Kind))
	b = le64(b, m.Offset)
	return appendBytes(b, m.Data)
}

func decodeOutput(r *reader) Msg {
	var m Output
	m.Seq = r.u64()
	m.Epoch = r.u64()
	m.Pos = r.pos()
	m.OutSeq = r.u64()
	m.Done = r.u64()
	m.Kind = Kind(r.u8())
	m.Offset = r.u64()
	m.Data = r.bytes()
	return m
}

func (m Performed) appendBody(b []byte) []byte { return le64(b, m.OutSeq) }
func decodePerformed(r *reader) Msg            { return Performed{OutSeq: r.u64()} }

func (m Ack) appendBody(b []byte) []byte { return le64(b, m.Seq) }
func decodeAck(r *reader) Msg            { return Ack{Seq: r.u64()} }

func (m CheckpointRequest) appendBody(b []byte) []byte {
	b = le64(b, m.Epoch)
	b = appendPos(b, m.Pos)
	b = append(b, boolByte(m.Pages))
	return appendBytes(b, []byte(m.Reason))
}

func decodeCheckpointRequest(r *reader) Msg {
	var m CheckpointRequest
	m.Epoch = r.u64()
	m.Pos = r.pos()
	m.Pages = r.bool()
	m.Reason = string(r.bytes())
	return m
}

func (m Heartbeat) appendBody(b []byte) []byte {
	b = le64(b, m.Epoch)
	return appendPos(b, m.Pos)
}

func decodeHeartbeat(r *reader) Msg {
	var m Heartbeat
	m.Epoch = r.u64()
	m.Pos = r.pos()
	return m
}

func (m Goodbye) appendBody(b []byte) []byte {
	b = le64(b, m.Seq)
	return le32(b, uint32(m.Status))
}

func decodeGoodbye(r *reader) Msg {
	var m Goodbye
	m.Seq = r.u64()
	m.Status = int32(r.u32())
	return m
}

func (m DiskData) appendBody(b []byte) []byte {
	b = le32(b, m.Disk)
	b = le64(b, m.Offset)
	b = append(b, boolByte(m.Last))
	b = append(b, m.Digest[:]...)
	return appendBytes(b, m.Data)
}

func decodeDiskData(r *reader) Msg {
	var m DiskData
	m.Disk = r.u32()
	m.Offset = r.u64()
	m.Last = r.bool()
	m.Digest = r.digest()
	m.Data = r.bytes()
	if len(m.Data) > MaxDiskData || m.Disk >= MaxDisks {
		r.bad = true
	}
	return m
}

func (m PageHashes) appendBody(b []byte) []byte {
	b = le64(b, m.Epoch)
	b = appendPos(b, m.Pos)
	b = le64(b, m.First)
	b = le64(b, m.Total)
	b = append(b, boolByte(m.Last))
	b = append(b, m.Regs[:]...)
	b = le32(b, uint32(len(m.Hashes)))
	for _, h := range m.Hashes {
		b = le64(b, h)
	}
	return b
}

func decodePageHashes(r *reader) Msg {
	var m PageHashes
	m.Epoch = r.u64()
	m.Pos = r.pos()
	m.First = r.u64()
	m.Total = r.u64()
	m.Last = r.bool()
	m.Regs = r.digest()
	n := r.u32()
	if r.bad || n > MaxPageHashes || uint64(n)*8 > uint64(len(r.b)) {
		r.bad = true
		return m
	}
	if n > 0 {
		m.Hashes = make([]uint64, n)
		for i := range m.Hashes {
			m.Hashes[i] = r.u64()
		}
	}
	return m
}

var decoders = [typeLimit]func(*reader) Msg{
	TypeHello:             decodeHello,
	TypeRefuse:            decodeRefuse,
	TypeRecord:            decodeRecord,
	TypeEpochEnd:          decodeEpochEnd,
	TypeCheckpoint:        decodeCheckpoint,
	TypeOutput:            decodeOutput,
	TypePerformed:         decodePerformed,
	TypeAck:               decodeAck,
	TypeCheckpointRequest: decodeCheckpointRequest,
	TypeHeartbeat:         decodeHeartbeat,
	TypeGoodbye:           decodeGoodbye,
	TypeDiskData:          decodeDiskData,
	TypePageHashes:        decodePageHashes,
}
